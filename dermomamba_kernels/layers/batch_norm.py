"""BatchNorm2d whose forward goes through the ``batch_norm`` dispatch point."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..batch_norm import batch_norm


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (same constructor, parameters, buffers and state_dict) with a choice of backend.

    Args: as nn.BatchNorm2d (num_features, eps, momentum, affine, track_running_stats, device, dtype),
    plus ``backend``: "auto" (also for None: PyTorch's native kernel, or the Triton kernels on CUDA
    when the environment sets ``DERMOMAMBA_BATCHNORM_BACKEND=triton``), "reference", "cpu" or "triton"
    (see :func:`dermomamba_kernels.batch_norm.batch_norm`). Training / eval behave exactly as
    nn.BatchNorm2d: batch statistics and an in-place update of running_mean, running_var and
    num_batches_tracked in training (``momentum=None``: cumulative average), running statistics in eval
    (batch statistics when track_running_stats=False).

    Parameters: ``weight``, ``bias`` (C,) when affine; buffers ``running_mean``, ``running_var`` (C,) and
    ``num_batches_tracked`` () when track_running_stats.

    Shapes: (N, C, H, W) -> the same (on the triton backend, in the input's memory format).

    Example:
        >>> bn = BatchNorm2d(16)
        >>> bn(torch.randn(2, 16, 12, 10)).shape, int(bn.num_batches_tracked)
        (torch.Size([2, 16, 12, 10]), 1)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        # None means "auto", not the process-wide DERMOMAMBA_BACKEND: that variable picks the kernels of the
        # scans, CBAM and the loss, and a process set to "cuda" (no BatchNorm kernel of ours) must not stop
        # every model's norms. Ask for a norm backend here, by name.
        self.backend = "auto" if backend is None else backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        counter = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                counter = self.num_batches_tracked  # cumulative average: 1 / batches so far
        # as nn.BatchNorm: eval normalises with batch statistics when there are no running ones
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return batch_norm(x, self.running_mean if keep_running else None, self.running_var if keep_running else None,
                          self.weight, self.bias, use_batch_stats,
                          self.momentum if self.momentum is not None or counter is not None else 0.0, self.eps,
                          num_batches_tracked=counter, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
