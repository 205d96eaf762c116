"""Rotary position embedding, rotate-half (NeoX) style as in HF Llama/Phi/Gemma, on the first rotary_dim dims.

For d < rotary_dim, with half = rotary_dim // 2:
    out[d] = x[d] * cos[d] - x[d + half] * sin[d]     (d < half)
    out[d] = x[d] * cos[d] + x[d - half] * sin[d]     (half <= d < rotary_dim)
and dims >= rotary_dim pass through (Phi-2 rotates 32 of 80). ``cos``/``sin`` are HF's [B, S, rotary_dim]
tables already gathered at the token positions (both halves equal). Works in place (``out is x``).
"""

import torch

from edgelmm.kernels._common import check, check_tensor, next_power_of_2, require_triton, tl, triton

# (dtype, BLOCK_D) -> (BLOCK_S, num_warps); tests/kernels/test_compile.py compiles each entry.
LAUNCH_CONFIGS = {
    (torch.float16, 64): (32, 4),
    (torch.float16, 128): (16, 4),
    (torch.float16, 256): (8, 4),
    (torch.float32, 64): (16, 4),
    (torch.float32, 128): (8, 4),
    (torch.float32, 256): (4, 4),
}


@triton.jit(do_not_specialize=["num_heads", "seq_len"])
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    num_heads, seq_len, head_dim, rotary_dim, store_dim,  # store_dim: rotary_dim in place, else head_dim
    stride_xb, stride_xh, stride_xs,
    stride_ob, stride_oh, stride_os,
    stride_cb, stride_cs, stride_sb, stride_ss,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0) // num_heads
    head = tl.program_id(0) % num_heads
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    half = rotary_dim // 2
    rotated = offs_d < rotary_dim
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)  # the rotate-half source dim
    sign = tl.where(offs_d < half, -1.0, 1.0)
    s_mask = (offs_s < seq_len)[:, None]
    x_rows = x_ptr + batch * stride_xb + head * stride_xh + offs_s[:, None] * stride_xs
    x = tl.load(x_rows + offs_d[None, :], mask=s_mask & (offs_d < head_dim)[None, :],
                other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
    rot_mask = s_mask & rotated[None, :]
    x_partner = tl.load(x_rows + partner[None, :], mask=rot_mask, other=0.0).to(tl.float32)  # [BS, BD]
    cos = tl.load(cos_ptr + batch * stride_cb + offs_s[:, None] * stride_cs + offs_d[None, :], mask=rot_mask,
                  other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + batch * stride_sb + offs_s[:, None] * stride_ss + offs_d[None, :], mask=rot_mask,
                  other=0.0).to(tl.float32)
    y = x * cos + sign[None, :] * x_partner * sin  # dims >= rotary_dim: cos = 1, sin = 0
    o_ptrs = out_ptr + batch * stride_ob + head * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=s_mask & (offs_d < store_dim)[None, :])


def _check_args(x, cos, sin, out, rotary_dim):
    check(x.dim() == 4, f"x must be [B, H, S, D], got shape {tuple(x.shape)}")
    batch, num_heads, seq_len, head_dim = x.shape
    check(rotary_dim % 2 == 0 and 2 <= rotary_dim <= head_dim,
          f"rotary_dim must be even and in [2, head_dim={head_dim}], got {rotary_dim}")
    check_tensor("x", x, (batch, num_heads, seq_len, head_dim), (torch.float16, torch.float32), x.device)
    check_tensor("out", out, tuple(x.shape), (x.dtype,), x.device)
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, (batch, seq_len, rotary_dim), (x.dtype, torch.float32), x.device)


def rotary_triton(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """Apply rotate-half RoPE to ``x[..., :rotary_dim]`` into ``out`` (may be ``x``); returns ``out``.

    x, out: [B, H, S, D] fp16/fp32 (strided views fine, last dim contiguous); cos, sin: [B, S, rotary_dim]
    in x's dtype or fp32 (expand a [1, S, r] table over B with stride 0). D <= 256; math in fp32.
    """
    require_triton(x)
    _check_args(x, cos, sin, out, rotary_dim)
    batch, num_heads, seq_len, head_dim = x.shape
    block_d = max(64, next_power_of_2(head_dim))
    config = LAUNCH_CONFIGS.get((x.dtype, block_d))
    check(config is not None, f"head_dim {head_dim} unsupported: at most 256")
    block_s, num_warps = config
    in_place = out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
    check(in_place or out.data_ptr() != x.data_ptr(), "out must be x itself or not overlap it")
    _rotary_kernel[(batch * num_heads, triton.cdiv(seq_len, block_s))](
        x, cos, sin, out,
        num_heads, seq_len, head_dim, rotary_dim, rotary_dim if in_place else head_dim,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def rotary_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`rotary_triton` (fp32 math)."""
    _check_args(x, cos, sin, out, rotary_dim)
    half = rotary_dim // 2
    x_rot = x[..., :rotary_dim].float()  # [B, H, S, r]
    rotate_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)  # [B, H, S, r]
    y = x_rot * cos.float()[:, None] + rotate_half * sin.float()[:, None]  # [B, H, S, r]
    if out.data_ptr() != x.data_ptr():
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    out[..., :rotary_dim].copy_(y)
    return out
