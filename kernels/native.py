"""Fast PyTorch implementations of the kernel ops for devices without Triton (the CPU path): the same
signatures as the ``*_triton`` wrappers, built on PyTorch's own fused kernels (SDPA, native norms) and
working in the input dtype (bf16/fp16/fp32) where the ``*_ref`` oracles upcast everything to fp32.
Checked against the references in tests/kernels/test_native.py."""
import torch
import torch.nn.functional as F

from edgelmm.kernels.gptq_matmul import dequantize_ref
from edgelmm.kernels.rotary import rotary_ref


def _sdpa_into(out: torch.Tensor, q, k, v, sm_scale: float, mask=None, causal: bool = False) -> torch.Tensor:
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=sm_scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return out.copy_(y)


def prefill_attention_native(q, k, v, out, sm_scale: float, causal: bool) -> torch.Tensor:
    """Attention of q [B, Hq, S_q, D] over k/v [B, Hkv, S_kv, D]; causal is aligned to the end."""
    s_q, s_kv = q.shape[2], k.shape[2]
    if not causal or s_q == s_kv:
        return _sdpa_into(out, q, k, v, sm_scale, causal=causal)
    visible = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device).tril(diagonal=s_kv - s_q)  # [S_q, S_kv]
    return _sdpa_into(out, q, k, v, sm_scale, mask=visible)


def decode_attention_native(q, k_cache, v_cache, kv_lens, out, sm_scale: float, *, k_scale=None, v_scale=None,
                            part_out=None, part_lse=None) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over the first ``kv_lens[b]`` cache positions [B, Hkv, S_max, D]
    (int8 caches are dequantized with their per-token scales; no split workspace is needed)."""
    lengths = kv_lens.tolist()
    longest = max(lengths)
    k, v = k_cache[:, :, :longest], v_cache[:, :, :longest]  # [B, Hkv, L, D]
    if k_scale is not None:
        k = (k.float() * k_scale[:, :, :longest, None].float()).to(q.dtype)
        v = (v.float() * v_scale[:, :, :longest, None].float()).to(q.dtype)
    mask = None
    if min(lengths) != longest:
        mask = (torch.arange(longest, device=q.device)[None, :] < kv_lens[:, None])[:, None, None]  # [B,1,1,L]
    _sdpa_into(out[:, :, None], q[:, :, None], k, v, sm_scale, mask=mask)
    return out


def _norm(x, weight, bias, out, eps, residual, residual_out, gemma: bool) -> torch.Tensor:
    if residual is not None:
        residual_out.copy_(x + residual)
        x = residual_out
    if bias is not None:
        return out.copy_(F.layer_norm(x, weight.shape, weight, bias, eps))
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:  # Gemma scales by (1 + w) in fp32, then casts
        return out.copy_(h * (1.0 + weight.float()))
    return out.copy_(weight * h.to(x.dtype))


def rms_norm_native(x, weight, out, eps: float, *, residual=None, residual_out=None, gemma: bool = False):
    """``out = rmsnorm(x + residual) * w`` (``(1 + w)`` for Gemma); statistics in fp32."""
    return _norm(x, weight, None, out, eps, residual, residual_out, gemma)


def layer_norm_native(x, weight, bias, out, eps: float, *, residual=None, residual_out=None):
    """``out = layernorm(x + residual) * w + b`` (PyTorch's native LayerNorm)."""
    return _norm(x, weight, bias, out, eps, residual, residual_out, False)


def rotary_native(x, cos, sin, out, rotary_dim: int) -> torch.Tensor:
    """Rotary embedding of the first ``rotary_dim`` dims (elementwise on q/k: the reference is cheap)."""
    return rotary_ref(x, cos, sin, out, rotary_dim)


def gptq_matmul_native(x, qweight, qzeros, scales, g_idx, bias, out, *, bits: int, group_size: int,
                       zero_v1: bool) -> torch.Tensor:
    """GPTQ matmul by dequantize-then-matmul, the matmul in x's dtype."""
    weight = dequantize_ref(qweight, qzeros, scales, g_idx, bits=bits, group_size=group_size,
                            zero_v1=zero_v1).to(x.dtype)  # [K, N]
    return torch.addmm(bias, x, weight, out=out) if bias is not None else torch.mm(x, weight, out=out)
