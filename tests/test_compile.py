"""The whole network under torch.compile(fullgraph=True): every op it uses is a custom op with a fake
implementation and the dispatch makes no graph break (issue 9 asks for this test)."""

import pytest
import torch

import dermomamba
import dermomamba_kernels as dk


def test_tiny_model_compiles_without_graph_breaks(seed):
    model = dermomamba.create_model("dermomamba_tiny", img_size=(64, 96))
    images = torch.randn(2, 3, 64, 96)
    # aot_eager traces forward and backward through dynamo and AOTAutograd (where graph breaks and
    # missing fake kernels show up) without paying for inductor's C++ compile on a 2-core CI box.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(images)
    expected = model(images)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


@pytest.mark.gpu
def test_tiny_model_compiles_on_gpu(seed):
    if not dk.compiled_with_cuda():
        pytest.skip("dermomamba_kernels._C was built without CUDA kernels")
    model = dermomamba.create_model("dermomamba_tiny", img_size=(64, 96)).cuda()
    images = torch.randn(2, 3, 64, 96, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(images)
    torch.testing.assert_close(out, model(images), rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
