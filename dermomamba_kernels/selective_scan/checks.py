"""Input validation of the public selective-scan functions, shared by every backend.

Each check raises with the argument's name: TypeError for a non-tensor or an unsupported dtype,
ValueError for a wrong shape or layout, RuntimeError for tensors on different devices (torch's own
convention). Strides are not checked here: every backend takes any strided view.
"""

from __future__ import annotations

import torch

# float64 is accepted for the reference backend; the C++/CUDA kernels take the first three only
# (see KERNEL_DTYPES and check_kernel_dtypes).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_DIRECTIONS = 4


def _dtype_names(dtypes=SUPPORTED_DTYPES):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_tensor(t, name, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.is_complex():
        raise TypeError(f"{name} must be real; complex tensors ({t.dtype}) are not supported")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have a float dtype ({_dtype_names()}), got {t.dtype}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_shape(t, name, expected, meaning):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def _check_device(t, name, reference, reference_name):
    if t.device != reference.device:
        raise RuntimeError(f"{name} is on {t.device} but {reference_name} is on {reference.device}; "
                           "all tensors must be on one device")


def check_selective_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """Validate the tensors of :func:`selective_scan_fn` (mamba_ssm conventions).

    u, delta, z: (batch, dim, L) with one float dtype; A: (dim, N) real; B, C: (dim, N),
    (batch, N, L) or (batch, groups, N, L) with groups dividing dim; D, delta_bias: (dim,).

    Example:
        >>> check_selective_scan_inputs(torch.randn(1, 4, 9), torch.rand(1, 4, 9), -torch.rand(4, 16),
        ...                             torch.randn(1, 16, 9), torch.randn(1, 16, 9))
    """
    _check_tensor(u, "u", 3)
    batch, dim, length = u.shape
    if length < 1 or dim < 1 or batch < 1:
        raise ValueError(f"u must have batch, dim and L >= 1, got shape {tuple(u.shape)}")
    _check_tensor(delta, "delta", 3)
    _check_shape(delta, "delta", u.shape, "(batch, dim, L) of u")
    if delta.dtype != u.dtype:
        raise TypeError(f"delta must have u's dtype {u.dtype}, got {delta.dtype}")
    _check_device(delta, "delta", u, "u")

    _check_tensor(A, "A", 2)
    if A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must have shape (dim, N) with dim = {dim} and N >= 1, got {tuple(A.shape)}")
    _check_device(A, "A", u, "u")
    dstate = A.shape[1]

    for name, M in (("B", B), ("C", C)):
        _check_tensor(M, name, (2, 3, 4))
        _check_device(M, name, u, "u")
        if M.dim() == 2:
            _check_shape(M, name, (dim, dstate), "(dim, N) for a constant " + name)
        elif M.dim() == 3:
            _check_shape(M, name, (batch, dstate, length), "(batch, N, L)")
        else:
            groups = M.shape[1]
            if groups < 1 or dim % groups != 0:
                raise ValueError(f"{name} has {groups} groups, which must divide dim = {dim}")
            _check_shape(M, name, (batch, groups, dstate, length), "(batch, groups, N, L)")

    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            _check_tensor(v, name, 1)
            _check_shape(v, name, (dim,), "(dim,)")
            _check_device(v, name, u, "u")
    if z is not None:
        _check_tensor(z, "z", 3)
        _check_shape(z, "z", u.shape, "(batch, dim, L) of u")
        if z.dtype != u.dtype:
            raise TypeError(f"z must have u's dtype {u.dtype}, got {z.dtype}")
        _check_device(z, "z", u, "u")


def check_multiaxial_inputs(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """Validate the tensors of :func:`multiaxial_selective_scan` (VMamba SS2D names).

    x: (batch, D, H, W), any strides; x_proj_weight (4, R + 2N, D); dt_projs_weight (4, D, R);
    dt_projs_bias (4, D); A_logs (4 * D, N); Ds (4 * D,). Weights may have another float dtype
    than x (they are cast to x's dtype for the projections, as autocast does).

    Example:
        >>> check_multiaxial_inputs(torch.randn(1, 8, 5, 7), torch.randn(4, 33, 8), torch.randn(4, 8, 1),
        ...                         torch.randn(4, 8), torch.rand(32, 16), torch.ones(32))
    """
    _check_tensor(x, "x", 4)
    batch, dim, height, width = x.shape
    if min(batch, dim, height, width) < 1:
        raise ValueError(f"x must have batch, D, H and W >= 1, got shape {tuple(x.shape)}")
    _check_tensor(dt_projs_weight, "dt_projs_weight", 3)
    if dt_projs_weight.shape[0] != NUM_DIRECTIONS or dt_projs_weight.shape[1] != dim or dt_projs_weight.shape[2] < 1:
        raise ValueError(f"dt_projs_weight must have shape (4, D, R) with D = {dim} and R >= 1, "
                         f"got {tuple(dt_projs_weight.shape)}")
    dt_rank = dt_projs_weight.shape[2]
    _check_tensor(A_logs, "A_logs", 2)
    if A_logs.shape[0] != NUM_DIRECTIONS * dim or A_logs.shape[1] < 1:
        raise ValueError(f"A_logs must have shape (4 * D, N) with 4 * D = {NUM_DIRECTIONS * dim} and N >= 1, "
                         f"got {tuple(A_logs.shape)}")
    dstate = A_logs.shape[1]
    _check_tensor(x_proj_weight, "x_proj_weight", 3)
    _check_shape(x_proj_weight, "x_proj_weight", (NUM_DIRECTIONS, dt_rank + 2 * dstate, dim), "(4, R + 2N, D)")
    _check_tensor(dt_projs_bias, "dt_projs_bias", 2)
    _check_shape(dt_projs_bias, "dt_projs_bias", (NUM_DIRECTIONS, dim), "(4, D)")
    _check_tensor(Ds, "Ds", 1)
    _check_shape(Ds, "Ds", (NUM_DIRECTIONS * dim,), "(4 * D,)")
    for name, t in (("x_proj_weight", x_proj_weight), ("dt_projs_weight", dt_projs_weight),
                    ("dt_projs_bias", dt_projs_bias), ("A_logs", A_logs), ("Ds", Ds)):
        _check_device(t, name, x, "x")


def check_kernel_dtypes(backend, **tensors):
    """The C++/CUDA kernels compute in fp32 from fp32/fp16/bf16 inputs; float64 is for the reference.

    Example:
        >>> check_kernel_dtypes("cpu", u=torch.randn(1, 4, 9))
    """
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the {backend} kernels take {_dtype_names(KERNEL_DTYPES)} "
                            "(use backend='reference' for float64)")
