"""One dispatch point per op: ``backend="auto" | "cuda" | "triton" | "cpu" | "reference"``.

Every public op owns an :class:`OpDispatcher`. Each backend registers an implementation together
with an availability check that answers *why not* when it cannot run. Asking for a backend by name
that cannot run raises :class:`BackendUnavailableError` with that reason: nothing falls back
silently. ``"auto"`` walks a fixed preference list for the device of the inputs (CUDA kernels when
built, else Triton on a GPU; the C++ CPU kernels on the CPU) and ends at the reference.

The process-wide default comes from the environment variable ``DERMOMAMBA_BACKEND`` (one of the
names above); a ``backend=`` argument always wins over it. Which backend ran last is kept per op
(:func:`last_backend`) and logged at DEBUG level on the ``dermomamba_kernels`` logger.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger("dermomamba_kernels")

BACKEND_ENV_VAR = "DERMOMAMBA_BACKEND"
BACKENDS = ("cuda", "triton", "cpu", "reference")
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# An availability check returns None when the backend can run on that device, else the reason.
Availability = Callable[[torch.device], Optional[str]]

_DISPATCHERS: Dict[str, "OpDispatcher"] = {}


_graph_recording = threading.local()


@contextlib.contextmanager
def graph_recording():
    """Marks code that is warmed up for and recorded into a CUDA graph (replayed later without the host).

    Some Triton kernels (BatchNorm on few channels, the depthwise convs' weight gradient, the fused gated
    LayerNorm) do a call's work in less GPU time than PyTorch's kernels but with more, smaller launches. In
    a graph the launches cost nothing and they win; issued one by one from Python, a host-bound eager step
    loses more in launches than it gains (measured: benchmarks/RESULTS.md, seventh session). So their
    "auto" picks them inside this context and PyTorch's kernels outside it. The warm-up calls before a
    capture must run inside it too: they compile the kernels the capture records.

    Example:
        >>> with graph_recording():
        ...     in_graph_recording()
        True
    """
    depth = getattr(_graph_recording, "depth", 0)
    _graph_recording.depth = depth + 1
    try:
        yield
    finally:
        _graph_recording.depth = depth


def in_graph_recording() -> bool:
    """True inside :func:`graph_recording` (on this thread)."""
    return getattr(_graph_recording, "depth", 0) > 0


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name (argument or environment) and cannot run."""


def default_backend() -> str:
    requested = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV_VAR}={requested!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    return requested


class OpDispatcher:
    """Chooses and calls one implementation of an op."""

    def __init__(self, op_name: str, auto_order: Optional[Dict[str, Tuple[str, ...]]] = None):
        self.op_name = op_name
        # Per device type, the backends "auto" tries in turn; an op whose kernels are not yet shown
        # faster than the reference on some device narrows it (default: AUTO_ORDER).
        self.auto_order = AUTO_ORDER if auto_order is None else auto_order
        self._impls: Dict[str, Tuple[Callable, Availability]] = {}
        self.last_backend: Optional[str] = None
        _DISPATCHERS[op_name] = self

    def register(self, backend: str, available: Availability):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for {self.op_name}")

        def decorator(fn):
            self._impls[backend] = (fn, available)
            return fn

        return decorator

    def unavailable_reason(self, backend: str, device: torch.device) -> Optional[str]:
        if backend not in self._impls:
            return f"{self.op_name} has no {backend!r} implementation"
        return self._impls[backend][1](device)

    def prefers_while_recording(self, backend: str, device: torch.device) -> bool:
        """Whether "auto" should take ``backend`` (a kernel that wins only where launches are free) for a call
        on ``device`` now: inside :func:`graph_recording`, on a CUDA device, where ``backend`` can run."""
        return device.type == "cuda" and in_graph_recording() and self.unavailable_reason(backend, device) is None

    def available(self, device: torch.device):
        return [b for b in BACKENDS if self.unavailable_reason(b, device) is None]

    def resolve(self, backend: Optional[str], device: torch.device) -> str:
        backend = default_backend() if backend is None else backend.strip().lower()
        if backend == "auto":
            for candidate in self.auto_order.get(device.type, ("reference",)):
                if self.unavailable_reason(candidate, device) is None:
                    return candidate
            raise BackendUnavailableError(f"{self.op_name}: no backend can run on {device}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of auto, {', '.join(BACKENDS)}")
        reason = self.unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"{self.op_name}: backend={backend!r} is unavailable: {reason}")
        return backend

    def __call__(self, backend: Optional[str], device: torch.device, *args, **kwargs):
        if torch.compiler.is_compiling():
            # Dynamo can trace neither the availability checks (imports, importlib lookups) nor the
            # logging: under torch.compile the choice is made once, at trace time, as a constant,
            # so that models using these ops compile with fullgraph=True.
            chosen = _resolve_as_constant(self.op_name, backend, device)
        else:
            chosen = self.resolve(backend, device)
            self.last_backend = chosen
            logger.debug("%s -> %s backend on %s", self.op_name, chosen, device)
        return self._impls[chosen][0](*args, **kwargs)


@torch.compiler.assume_constant_result
def _resolve_as_constant(op_name: str, backend: Optional[str], device: torch.device) -> str:
    return _DISPATCHERS[op_name].resolve(backend, device)


def last_backend(op_name: str) -> Optional[str]:
    """The backend that ran the most recent call of ``op_name`` in this process (None if none)."""
    return _DISPATCHERS[op_name].last_backend


def available_backends(op_name: str, device="cpu"):
    """Backends that can run ``op_name`` on ``device`` now, in preference order."""
    return _DISPATCHERS[op_name].available(torch.device(device))


def unavailable_reasons(op_name: str, device="cpu") -> Dict[str, str]:
    """For each backend that cannot run ``op_name`` on ``device``, the reason why."""
    dispatcher = _DISPATCHERS[op_name]
    device = torch.device(device)
    reasons = {b: dispatcher.unavailable_reason(b, device) for b in BACKENDS}
    return {b: r for b, r in reasons.items() if r is not None}


# --- availability checks shared by the ops --------------------------------------------------

def always(device: torch.device) -> Optional[str]:
    return None


def cpu_tensors(device: torch.device) -> Optional[str]:
    """For ops whose CPU path is vectorised PyTorch (no compiled kernel needed)."""
    return None if device.type == "cpu" else f"the CPU path takes CPU tensors, got {device}"


def cpu_extension(device: torch.device) -> Optional[str]:
    from . import _ext

    if device.type != "cpu":
        return f"the C++ CPU kernels take CPU tensors, got {device}"
    if not _ext.extension_loaded():
        return f"dermomamba_kernels._C is not built or failed to load ({_ext.extension_error()})"
    return None


def cuda_extension(device: torch.device) -> Optional[str]:
    from . import _ext

    if device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, got {device}"
    if not _ext.extension_loaded():
        return f"dermomamba_kernels._C is not built or failed to load ({_ext.extension_error()})"
    if not _ext.compiled_with_cuda():
        return "dermomamba_kernels._C was built without CUDA kernels (no nvcc or CPU-only torch at install)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _missing_kernel_image(index)


@functools.lru_cache(maxsize=None)
def _missing_kernel_image(device_index: int) -> Optional[str]:
    # Asked on every dispatch: the capability of a device does not change within a process.
    from . import _ext

    return _ext.missing_kernel_image(torch.cuda.get_device_capability(device_index))


def triton_runtime(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton ships with CUDA builds of torch
        return f"triton is not importable ({exc})"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        return None if not interpreted else "TRITON_INTERPRET=1 runs Triton on CPU tensors only"
    if device.type == "cpu" and interpreted:
        return None
    return f"Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"


def triton_kernels(module: str) -> Availability:
    """Triton availability for an op whose kernels live in ``module`` (importable once written)."""
    import importlib.util

    def check(device: torch.device) -> Optional[str]:
        reason = triton_runtime(device)
        if reason is not None:
            return reason
        if importlib.util.find_spec(module) is None:
            return f"this install has no Triton kernels for it ({module} is missing)"
        return None

    return check
