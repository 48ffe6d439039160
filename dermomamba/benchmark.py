"""Timing machinery shared by ``dermomamba benchmark`` and ``benchmarks/`` (the comparison with the published
code path itself is in :mod:`dermomamba.published_path`).

A training step is forward, loss, backward and an Adam step (with a GradScaler under fp16 autocast);
inference is a no-grad forward in eval mode. Times are medians over timed repetitions after untimed
warm-ups: CUDA events around each repetition on a GPU (each one waited for, so host work inside the
step, such as a distance transform on the host, is counted), ``time.perf_counter`` on the CPU.

Example:
    >>> from dermomamba.models import create_model
    >>> model = create_model("dermomamba_tiny", img_size=(32, 32))
    >>> images, masks = random_batch(2, (32, 32), torch.device("cpu"))
    >>> step = make_train_step(model, images, masks, bce_dice_loss, precision="fp32")
    >>> len(time_ms(step, torch.device("cpu"), warmup=0, repeats=2))
    2
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dermomamba_kernels import graph_recording

PRECISIONS = ("fp32", "fp16", "bf16")
# Released recipe: Adam at 1e-4 (the step's cost does not depend on the value).
LEARNING_RATE = 1e-4
# Soft Dice smoothing of the plain BCE + Dice loss (the Guide Fusion Loss's value, for a like-for-like
# network-only comparison).
DICE_SMOOTH = 1e-3


def bce_dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain BCE on logits + one soft Dice over the batch: the loss without a distance transform.

    Shapes: pred logits (B, 1, H, W), target (B, 1, H, W) in [0, 1]; returns a float32 scalar.

    Example:
        >>> bce_dice_loss(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)).shape
        torch.Size([])
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        logits, t = pred.float(), target.float()
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * t).sum() + DICE_SMOOTH) / (p.sum() + t.sum() + DICE_SMOOTH)
        return F.binary_cross_entropy_with_logits(logits, t) + dice


def random_batch(batch_size: int, img_size: Tuple[int, int], device: torch.device):
    """Images (B, 3, H, W) uniform in [0, 1) and 0/1 masks (B, 1, H, W) with blob-like lesions.

    The masks are thresholded smooth noise, so that they have boundaries at a realistic density (a
    distance transform's cost depends on them), not salt-and-pepper pixels.
    """
    height, width = img_size
    images = torch.rand(batch_size, 3, height, width, device=device)
    coarse = torch.rand(batch_size, 1, max(height // 16, 1), max(width // 16, 1), device=device)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return images, (smooth > 0.5).float()


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def make_forward(model, images, precision: str = "fp32") -> Callable[[], torch.Tensor]:
    """An inference call: eval mode, no gradient, autocast on CUDA unless ``precision`` is fp32."""
    dtype = autocast_dtype(precision)
    device_type = images.device.type
    use_amp = dtype is not None and device_type == "cuda"

    def forward():
        model.eval()
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype or torch.float32, enabled=use_amp):
            return model(images)

    return forward


def _train_step_body(model, images, masks, criterion, precision, optimizer, scaler, zero_grad=True):
    dtype = autocast_dtype(precision)
    device_type = images.device.type
    use_amp = dtype is not None and device_type == "cuda"

    def train_step():
        model.train()
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=use_amp):
            logits = model(images)
        loss = criterion(logits.float(), masks)
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return train_step


def _grad_scaler(images, precision):
    use_fp16 = autocast_dtype(precision) == torch.float16 and images.device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=use_fp16)


def make_train_step(model, images, masks, criterion, precision: str = "fp32", optimizer=None) -> Callable[[], None]:
    """One training step (train mode): forward under autocast, loss in fp32, backward, Adam step.

    ``optimizer`` defaults to a fresh Adam over the model's parameters; under fp16 a GradScaler
    scales the loss, as the training loop does.
    """
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    step = _train_step_body(model, images, masks, criterion, precision, optimizer, _grad_scaler(images, precision))

    def train_step():
        step()

    return train_step


# Eager calls before a capture: Triton compiles and autotunes, cuBLAS / cuDNN create their handles and
# pick algorithms, Adam and the GradScaler allocate their state. None of that may happen inside a capture.
CAPTURE_WARMUP_CALLS = 3


def capture_cuda_graph(fn: Callable[[], object], warmup: int = CAPTURE_WARMUP_CALLS):
    """Run ``fn`` ``warmup`` times on a side stream, then record one call as a CUDA graph.

    Returns ``(graph, result)``: ``graph.replay()`` re-runs the recorded kernels on the same memory
    (inputs are whatever the captured tensors hold at replay time); ``result`` is the captured call's
    return value, whose tensors each replay overwrites.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm-up and capture run the kernels chosen for graphs (see dermomamba_kernels.graph_recording).
    with graph_recording():
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = fn()
    return graph, result


def make_graphed_train_step(model, images, masks, criterion, precision: str = "fp32") -> Callable[[], torch.Tensor]:
    """The training step of :func:`make_train_step` recorded once as a CUDA graph; each call replays it.

    What makes the step capturable: no host synchronisation anywhere in the model and the loss, Adam
    with ``fused=True, capturable=True`` (its step counter lives on the device), and under fp16 a
    GradScaler whose inf check and scale update stay on the device (with a fused optimizer, GradScaler
    hands it ``grad_scale`` / ``found_inf`` tensors instead of reading them on the host). The gradients
    are set to None once before the capture, so that the recorded backward writes them rather than
    accumulating. ``images`` and ``masks`` are the graph's inputs: copy new batches into them.

    Shapes: images (B, 3, H, W), masks (B, 1, H, W), CUDA tensors. Returns a callable whose result is
    the loss tensor of the last replay (overwritten by the next one); its ``optimizer`` attribute is the
    captured Adam (read its state; changing its settings does not change the recorded step).

    Example (needs a GPU):
        >>> step = make_graphed_train_step(model, images, masks, bce_dice_loss, "fp16")  # doctest: +SKIP
        >>> images.copy_(next_images); masks.copy_(next_masks); loss = step()             # doctest: +SKIP
    """
    for name, tensor in (("images", images), ("masks", masks)):
        if tensor.device.type != "cuda":
            raise ValueError(f"{name}: CUDA graphs need CUDA tensors, got a tensor on {tensor.device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=True, capturable=True)
    body = _train_step_body(model, images, masks, criterion, precision, optimizer, _grad_scaler(images, precision),
                            zero_grad=False)

    def warm_step():
        optimizer.zero_grad(set_to_none=True)
        return body()

    side_warmup = torch.cuda.Stream()
    side_warmup.wait_stream(torch.cuda.current_stream())
    with graph_recording(), torch.cuda.stream(side_warmup):
        for _ in range(CAPTURE_WARMUP_CALLS):
            warm_step()
    torch.cuda.current_stream().wait_stream(side_warmup)
    optimizer.zero_grad(set_to_none=True)
    graph, loss = capture_cuda_graph(body, warmup=0)

    def replay():
        graph.replay()
        return loss

    replay.optimizer = optimizer  # its state (step counters, moments) for inspection; the graph owns the step
    return replay


def make_graphed_forward(model, images, precision: str = "fp32") -> Callable[[], torch.Tensor]:
    """:func:`make_forward` recorded once as a CUDA graph; each call replays it and returns its output
    tensor (overwritten by the next replay). ``images`` (B, 3, H, W), a CUDA tensor, is the input."""
    if images.device.type != "cuda":
        raise ValueError(f"images: CUDA graphs need CUDA tensors, got a tensor on {images.device}")
    graph, output = capture_cuda_graph(make_forward(model, images, precision))

    def replay():
        graph.replay()
        return output

    return replay


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, warmup: int = 3, repeats: int = 10) -> List[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def peak_memory_bytes(fn: Callable, device: torch.device) -> Optional[int]:
    """torch.cuda.max_memory_allocated over one call of ``fn`` (None on the CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def count_launches(fn: Callable, device: torch.device) -> Tuple[int, str]:
    """Launches of one call of ``fn`` under torch.profiler: (count, what was counted).

    On CUDA: kernels run on the device (memcpy and memset excluded, counted in neither). On the CPU
    there are no launches; the count is of the top-level ATen operators dispatched, the CPU's
    equivalent of per-op overhead.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset", "[memory]"))]
        return len(kernels), "CUDA kernels"
    aten = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(aten), "ATen ops"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def git_commit(root: str) -> str:
    """DERMOMAMBA_COMMIT when set, else the short commit of the git checkout at ``root`` (else "unknown").

    The variable wins: the GPU machine's copy of the tree is not a checkout of the commit that was sent (a
    ``.git`` left there by an earlier call named a stale commit, seen 2026-11-27)."""
    if os.environ.get("DERMOMAMBA_COMMIT"):
        return os.environ["DERMOMAMBA_COMMIT"]
    fallback = "unknown"
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True).stdout.strip() or fallback
    except OSError:
        return fallback
