"""Decode attention over the static KV cache: two-stage split-KV (flash-decoding) with grouped GQA.

Stage 1 runs on a (B, Hkv * head_blocks, num_splits) grid: each program loads one KV block once for all
(up to 16) query heads of its group and writes a partial output plus its log-sum-exp into caller-owned
buffers. Stage 2 merges the splits. The KV cache is fp16/fp32, or int8 with one scale per token and head
(the ``KV_INT8`` constexpr; values dequantize as ``int8 * scale``).
"""

import math

import torch

from edgelmm.kernels._common import check, check_tensor, next_power_of_2, require_triton, tl, triton

BLOCK_H = 16  # query heads per stage-1 program (tl.dot needs >= 16 rows); a GQA group of <= 16 reads KV once
# (dtype of q, KV_INT8, BLOCK_D) -> (BLOCK_N, num_warps, num_stages) for stage 1. Stage 2 uses
# STAGE2_NUM_WARPS for every (dtype, BLOCK_D). tests/kernels/test_compile.py compiles each entry.
LAUNCH_CONFIGS = {
    (dtype, kv_int8, block_d): (64 if block_d < 256 else 32, 4, 2)
    for dtype in (torch.float16, torch.float32)
    for kv_int8 in (False, True)
    for block_d in (64, 128, 256)
}
STAGE2_NUM_WARPS = 4


@triton.jit(do_not_specialize=["num_q_heads", "group_size", "head_blocks", "num_splits"])
def _decode_attention_stage1_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, kv_lens_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,  # sm_scale * log2(e)
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ksb, stride_ksh, stride_vsb, stride_vsh,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    num_q_heads, group_size, head_blocks, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_INT8: tl.constexpr,
):
    batch = tl.program_id(0)
    kv_head = tl.program_id(1) // head_blocks
    split = tl.program_id(2)
    head_in_group = (tl.program_id(1) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    heads = kv_head * group_size + head_in_group
    h_mask = (head_in_group < group_size) & (heads < num_q_heads)

    kv_len = tl.load(kv_lens_ptr + batch)
    split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        kv_idx = start_n + offs_n
        n_mask = kv_idx < end
        k = tl.load(k_base + kv_idx[None, :] * stride_ks + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(v_base + kv_idx[:, None] * stride_vs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0)  # [BLOCK_N, BLOCK_D]
        if KV_INT8:
            k_scale = tl.load(k_scale_ptr + batch * stride_ksb + kv_head * stride_ksh + kv_idx,
                              mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
            v_scale = tl.load(v_scale_ptr + batch * stride_vsb + kv_head * stride_vsh + kv_idx,
                              mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
            s = tl.dot(q, k.to(q.dtype)) * (k_scale[None, :] * qk_scale)  # int8 values are exact in fp16
            v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        else:
            s = tl.dot(q, k) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_H, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # An empty split (kv_len shorter than the split grid) stores lse = -inf and zeros.
    nonempty = l_i > 0.0
    lse2 = m_i + tl.log2(tl.where(nonempty, l_i, 1.0))  # base-2 log-sum-exp
    lse = tl.where(nonempty, lse2 * 0.6931471805599453, float("-inf"))  # natural log
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    po_ptrs = (part_o_ptr + batch * stride_pob + heads[:, None] * stride_poh + split * stride_pos
               + offs_d[None, :])
    tl.store(po_ptrs, out, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(part_lse_ptr + batch * stride_plb + heads * stride_plh + split, lse, mask=h_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_attention_stage2_kernel(
    part_o_ptr, part_lse_ptr, o_ptr,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    po_base = part_o_ptr + batch * stride_pob + head * stride_poh + offs_d
    pl_base = part_lse_ptr + batch * stride_plb + head * stride_plh
    m = tl.full([], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for split in range(num_splits):
        lse = tl.load(pl_base + split)
        m_new = tl.maximum(m, lse)
        if m_new > float("-inf"):  # skip empty splits (both -inf would give nan)
            alpha = tl.exp(m - m_new)
            w = tl.exp(lse - m_new)
            o = tl.load(po_base + split * stride_pos, mask=d_mask, other=0.0)  # [BLOCK_D]
            acc = acc * alpha + w * o
            denom = denom * alpha + w
            m = m_new
    tl.store(o_ptr + batch * stride_ob + head * stride_oh + offs_d, (acc / denom).to(o_ptr.dtype.element_ty),
             mask=d_mask)


def _check_args(q, k_cache, v_cache, kv_lens, out, k_scale, v_scale):
    check(q.dim() == 3, f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    batch, num_q_heads, head_dim = q.shape
    check(k_cache.dim() == 4, f"k_cache must be [B, Hkv, S_max, D], got shape {tuple(k_cache.shape)}")
    num_kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    check_tensor("q", q, (batch, num_q_heads, head_dim), (torch.float16, torch.float32), q.device)
    kv_int8 = k_cache.dtype == torch.int8
    cache_shape = (batch, num_kv_heads, max_seq, head_dim)
    check_tensor("k_cache", k_cache, cache_shape, (q.dtype, torch.int8), q.device)
    check_tensor("v_cache", v_cache, cache_shape, (k_cache.dtype,), q.device)
    check_tensor("kv_lens", kv_lens, (batch,), (torch.int32,), q.device)
    check_tensor("out", out, (batch, num_q_heads, head_dim), (q.dtype,), q.device)
    check(num_q_heads % num_kv_heads == 0,
          f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    check(kv_int8 == (k_scale is not None) == (v_scale is not None),
          "k_scale and v_scale are required for an int8 KV cache and must be None otherwise")
    if kv_int8:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            check_tensor(name, scale, (batch, num_kv_heads, max_seq), (torch.float16, torch.float32),
                         q.device)
    return kv_int8


def decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, out: torch.Tensor,
    sm_scale: float, *, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    part_out: torch.Tensor | None = None, part_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of attention over a static KV cache, written into ``out``; returns ``out``.

    q: [B, Hq, D] (the new token; its K/V must already be in the cache); k_cache, v_cache: [B, Hkv, S_max, D]
    (strided views of a bigger cache are fine); kv_lens: int32 [B], valid cache length per sequence, each
    >= 1 (read on the device, so CUDA graphs can replay with new lengths); out: [B, Hq, D].
    int8 cache: k_cache/v_cache int8 plus k_scale, v_scale: [B, Hkv, S_max] fp16/fp32 (per token and head).
    part_out: fp32 [B, Hq, num_splits, D] and part_lse: fp32 [B, Hq, num_splits] are the caller-owned stage-1
    workspace; num_splits is read from their shape (pick it so B * Hkv * num_splits fills the GPU).
    Accumulation is fp32; on a GPU fp32 inputs use TF32 tensor cores.
    """
    require_triton(q)
    kv_int8 = _check_args(q, k_cache, v_cache, kv_lens, out, k_scale, v_scale)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    check(part_out is not None and part_lse is not None, "part_out and part_lse workspaces are required")
    num_splits = part_lse.shape[-1] if part_lse.dim() == 3 else 0
    check_tensor("part_lse", part_lse, (batch, num_q_heads, num_splits), (torch.float32,), q.device)
    check_tensor("part_out", part_out, (batch, num_q_heads, num_splits, head_dim), (torch.float32,), q.device)
    check(num_splits >= 1, "part_lse needs at least one split")
    block_d = next_power_of_2(head_dim)
    config = LAUNCH_CONFIGS.get((q.dtype, kv_int8, block_d))
    check(config is not None, f"head_dim {head_dim} unsupported: need 33 <= head_dim <= 256")
    block_n, num_warps, num_stages = config
    group_size = num_q_heads // num_kv_heads
    head_blocks = triton.cdiv(group_size, BLOCK_H)
    k_scale = k_scale if kv_int8 else k_cache  # unused placeholders when KV_INT8 is False
    v_scale = v_scale if kv_int8 else v_cache
    _decode_attention_stage1_kernel[(batch, num_kv_heads * head_blocks, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, kv_lens, part_out, part_lse, sm_scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        num_q_heads, group_size, head_blocks, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=BLOCK_H, BLOCK_N=block_n, KV_INT8=kv_int8,
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_attention_stage2_kernel[(batch, num_q_heads)](
        part_out, part_lse, out,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=STAGE2_NUM_WARPS,
    )
    return out


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, out: torch.Tensor,
    sm_scale: float, *, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    part_out: torch.Tensor | None = None, part_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`decode_attention_triton` (fp32 math, same arguments).

    It has no split stage: ``part_out``/``part_lse`` are accepted for a uniform signature and left untouched.
    """
    kv_int8 = _check_args(q, k_cache, v_cache, kv_lens, out, k_scale, v_scale)
    group = q.shape[1] // k_cache.shape[1]
    kf, vf = k_cache.float(), v_cache.float()  # [B, Hkv, S_max, D]
    if kv_int8:
        kf = kf * k_scale.float()[..., None]
        vf = vf * v_scale.float()[..., None]
    kf = kf.repeat_interleave(group, dim=1)  # [B, Hq, S_max, D]
    vf = vf.repeat_interleave(group, dim=1)  # [B, Hq, S_max, D]
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * sm_scale  # [B, Hq, S_max]
    valid = torch.arange(k_cache.shape[2], device=q.device)[None, :] < kv_lens[:, None].long()  # [B, S_max]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    out.copy_(torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, dim=-1), vf))  # [B, Hq, D]
    return out


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization per token and head: x [..., D] -> (int8 [..., D], fp32 scale [...])."""
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-8) / 127.0  # [...]
    values = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)  # [..., D]
    return values, scale
