"""Fused residual-add + RMSNorm (Llama/Phi-3 style, or Gemma's ``(1 + w)``) and LayerNorm (with bias).

One kernel, one program per row: ``h = x (+ residual)``; optionally store ``h`` to ``residual_out`` (the next
layer's residual), then normalize ``h`` in fp32 and scale (and shift). ``IS_RMS`` and ``HAS_RESIDUAL`` are
constexprs; Gemma's ``1 + w`` is a runtime weight offset.
"""

import torch

from edgelmm.kernels._common import check, check_tensor, next_power_of_2, require_triton, tl, triton

# (dtype, BLOCK_N) -> num_warps; BLOCK_N is the smallest entry >= the hidden size. Launched with IS_RMS and
# HAS_RESIDUAL in {False, True}; tests/kernels/test_compile.py compiles each combination.
LAUNCH_CONFIGS = {
    (dtype, block_n): num_warps
    for dtype in (torch.float16, torch.float32)
    for block_n, num_warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))
}


@triton.jit
def _norm_kernel(
    x_ptr, residual_ptr, residual_out_ptr, weight_ptr, bias_ptr, out_ptr,
    N, eps, weight_offset,
    stride_x, stride_r, stride_ro, stride_o,
    BLOCK_N: tl.constexpr, IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(residual_out_ptr + row * stride_ro + cols, h.to(residual_out_ptr.dtype.element_ty),
                 mask=mask)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset
    if IS_RMS:
        y = h * tl.rsqrt(tl.sum(h * h, 0) / N + eps) * w
    else:
        centered = tl.where(mask, h - tl.sum(h, 0) / N, 0.0)
        b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = centered * tl.rsqrt(tl.sum(centered * centered, 0) / N + eps) * w + b
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    is_tensor = isinstance(t, torch.Tensor)
    check(is_tensor and t.dim() >= 1 and t.shape[-1] == n,
          f"{name} must be [..., {n}], got {tuple(t.shape) if is_tensor else type(t).__name__}")
    try:
        return t.view(-1, n)  # [rows, N]
    except RuntimeError:
        raise ValueError(f"{name} with shape {tuple(t.shape)} and strides {t.stride()} is not viewable as "
                         f"[-1, {n}]; make it contiguous") from None


def _prepare(x, weight, bias, out, residual, residual_out):
    """Check arguments and return 2-D row views (x, out, residual, residual_out)."""
    n = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() >= 1 else -1
    x2, out2 = _rows("x", x, n), _rows("out", out, n)
    dtypes = (torch.float16, torch.float32)
    check_tensor("x", x2, (None, n), dtypes, x.device)
    check_tensor("out", out2, tuple(x2.shape), (x.dtype,), x.device)
    check_tensor("weight", weight, (n,), dtypes, x.device)
    if bias is not None:
        check_tensor("bias", bias, (n,), dtypes, x.device)
    check((residual is None) == (residual_out is None), "residual and residual_out must be given together")
    if residual is None:
        return x2, out2, None, None
    r2, ro2 = _rows("residual", residual, n), _rows("residual_out", residual_out, n)
    check_tensor("residual", r2, tuple(x2.shape), (x.dtype,), x.device)
    check_tensor("residual_out", ro2, tuple(x2.shape), (x.dtype,), x.device)
    return x2, out2, r2, ro2


def _launch(x, weight, bias, out, eps, residual, residual_out, is_rms, weight_offset):
    require_triton(x)
    x2, out2, r2, ro2 = _prepare(x, weight, bias, out, residual, residual_out)
    n = x2.shape[1]
    block_n = max(1024, next_power_of_2(n))  # 1024, 2048, 4096 or 8192
    num_warps = LAUNCH_CONFIGS.get((x.dtype, block_n))
    check(num_warps is not None, f"hidden size {n} unsupported: at most 8192")
    has_residual = r2 is not None
    r2, ro2 = (r2, ro2) if has_residual else (x2, out2)  # unused placeholders when HAS_RESIDUAL is False
    _norm_kernel[(x2.shape[0],)](
        x2, r2, ro2, weight, weight if bias is None else bias, out2,
        n, eps, weight_offset,
        x2.stride(0), r2.stride(0), ro2.stride(0), out2.stride(0),
        BLOCK_N=block_n, IS_RMS=is_rms, HAS_RESIDUAL=has_residual, num_warps=num_warps,
    )
    return out


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float, *,
    residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, gemma: bool = False,
) -> torch.Tensor:
    """``out = rmsnorm(x + residual) * w`` (``* (1 + w)`` if ``gemma``); returns ``out``.

    x, out, residual, residual_out: [..., N] (each viewable as [rows, N]), same dtype (fp16/fp32);
    weight: [N]. With ``residual``, ``residual_out`` receives ``x + residual`` (may alias ``residual``).
    Statistics are fp32. N <= 8192.
    """
    return _launch(x, weight, None, out, eps, residual, residual_out, True, 1.0 if gemma else 0.0)


def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, eps: float, *,
    residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = layernorm(x + residual) * w + b``; returns ``out``. Same layouts as :func:`rms_norm_triton`."""
    check(bias is not None, "layer_norm needs a bias (pass zeros for a bias-free LayerNorm)")
    return _launch(x, weight, bias, out, eps, residual, residual_out, False, 0.0)


def _ref(x, weight, bias, out, eps, residual, residual_out, is_rms, weight_offset):
    x2, out2, r2, ro2 = _prepare(x, weight, bias, out, residual, residual_out)
    h = x2.float()  # [rows, N]
    if r2 is not None:
        h = h + r2.float()
        ro2.copy_(h)
    w = weight.float() + weight_offset
    if is_rms:
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w
    else:
        centered = h - h.mean(-1, keepdim=True)
        y = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * w + bias.float()
    out2.copy_(y)
    return out


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float, *,
    residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, gemma: bool = False,
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`rms_norm_triton` (fp32 math)."""
    return _ref(x, weight, None, out, eps, residual, residual_out, True, 1.0 if gemma else 0.0)


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, eps: float, *,
    residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`layer_norm_triton` (fp32 math)."""
    check(bias is not None, "layer_norm needs a bias (pass zeros for a bias-free LayerNorm)")
    return _ref(x, weight, bias, out, eps, residual, residual_out, False, 0.0)
