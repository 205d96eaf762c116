"""Shared helpers for the op modules: the optional triton import and argument checks.

The op modules define their kernels at module level. When triton is not installed, ``triton.jit`` and
``tl.constexpr`` are replaced by inert stand-ins so the modules (and their ``*_ref`` functions) still
import; the ``*_triton`` wrappers call :func:`require_triton` first and fail with a clear message.
"""

from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn=None, **kwargs: fn or (lambda f: f))
    tl = SimpleNamespace(constexpr=object)

__all__ = ["HAS_TRITON", "check", "check_tensor", "next_power_of_2", "require_triton", "tl", "triton"]

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "int8"}


def require_triton(x: torch.Tensor) -> None:
    """Fail clearly unless triton is installed and can run on ``x``'s device (CUDA, or CPU when
    interpreting) and dtype (bf16 runs on the torch references only)."""
    device = x.device
    if not HAS_TRITON:
        raise ModuleNotFoundError(
            "triton is not installed; install edgelmm[triton] or use the torch reference "
            "(EDGELMM_KERNELS=torch)"
        )
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"triton kernels need CUDA tensors (got {device}); "
                         "CPU tensors need TRITON_INTERPRET=1")
    check(x.dtype != torch.bfloat16, "the Triton kernels take fp16 or fp32; load the model with dtype=float16")


def check(cond: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``cond``."""
    if not cond:
        raise ValueError(message)


def check_tensor(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    """Check a tensor's shape, dtype, device and unit stride on the last dim (``None`` in shape = any)."""
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dim() == len(shape), f"{name} must have {len(shape)} dims {shape}, got shape {tuple(t.shape)}")
    for i, (got, want) in enumerate(zip(t.shape, shape)):
        check(want is None or got == want, f"{name} dim {i} must be {want}, got shape {tuple(t.shape)}")
    if torch.float16 in dtypes:  # the torch references also take bf16 (CPU inference); see require_triton
        dtypes = (*dtypes, torch.bfloat16)
    names = [DTYPE_NAMES.get(d, d) for d in dtypes]
    check(t.dtype in dtypes, f"{name} dtype must be one of {names}, got {t.dtype}")
    check(t.device == device, f"{name} is on {t.device}, expected {device}")
    check(t.shape[-1] <= 1 or t.stride(-1) == 1,
          f"{name} must have stride 1 on its last dim, got strides {t.stride()}")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
