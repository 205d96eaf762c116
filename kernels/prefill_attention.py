"""Prefill attention: flash-attention forward (online softmax), causal or not, MHA/GQA/MQA.

Used for the text prefill over [text + image tokens] (causal) and for the vision towers (non-causal).
The head dim is padded to the next power of two with masks, so 64, 72, 80, 88, 96, 128 and 256 all work.
"""

import math

import torch

from edgelmm.kernels._common import check, check_tensor, next_power_of_2, require_triton, tl, triton

# (dtype, BLOCK_D) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). The wrapper launches exactly these
# (for CAUSAL in {False, True}); tests/kernels/test_compile.py compiles every one for every target.
LAUNCH_CONFIGS = {
    (torch.float16, 64): (64, 64, 4, 3),
    (torch.float16, 128): (64, 64, 8, 2),
    (torch.float16, 256): (64, 32, 8, 2),
    (torch.float32, 64): (64, 32, 4, 2),
    (torch.float32, 128): (64, 32, 4, 2),
    (torch.float32, 256): (32, 32, 4, 1),
}


# Shape ints are not specialized on == 1, so the launched variants are exactly those in LAUNCH_CONFIGS.
@triton.jit(do_not_specialize=["num_q_heads", "group_size", "seq_q", "seq_kv"])
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    qk_scale,  # sm_scale * log2(e): the softmax runs in base 2
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    num_q_heads, group_size, seq_q, seq_kv,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    start_m = tl.program_id(0)
    batch = tl.program_id(1) // num_q_heads
    head = tl.program_id(1) % num_q_heads
    kv_head = head // group_size

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_ptrs = q_ptr + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < seq_q)[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Causal masking is bottom-right aligned: query i sees keys <= i + (seq_kv - seq_q), so a chunk of
    # queries appended after a cached prefix attends to the whole prefix.
    causal_offset = seq_kv - seq_q
    hi = seq_kv
    if CAUSAL:
        hi = tl.minimum(seq_kv, (start_m + 1) * BLOCK_M + causal_offset)
    for start_n in range(0, hi, BLOCK_N):
        kv_idx = start_n + offs_n
        kv_mask = kv_idx < seq_kv
        k = tl.load(k_base + kv_idx[None, :] * stride_ks + offs_d[:, None],
                    mask=kv_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N]
        valid = kv_mask[None, :]
        if CAUSAL:
            valid = valid & (kv_idx[None, :] <= offs_m[:, None] + causal_offset)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_idx[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m < seq_q)[:, None] & d_mask[None, :])


def _check_args(q, k, v, out, causal):
    check(q.dim() == 4, f"q must be [B, Hq, S, D], got shape {tuple(q.shape)}")
    batch, num_q_heads, seq_q, head_dim = q.shape
    check(k.dim() == 4, f"k must be [B, Hkv, S_kv, D], got shape {tuple(k.shape)}")
    num_kv_heads, seq_kv = k.shape[1], k.shape[2]
    dtypes = (torch.float16, torch.float32)
    check_tensor("q", q, (batch, num_q_heads, seq_q, head_dim), dtypes, q.device)
    check_tensor("k", k, (batch, num_kv_heads, seq_kv, head_dim), (q.dtype,), q.device)
    check_tensor("v", v, (batch, num_kv_heads, seq_kv, head_dim), (q.dtype,), q.device)
    check_tensor("out", out, tuple(q.shape), (q.dtype,), q.device)
    check(num_kv_heads >= 1 and num_q_heads % num_kv_heads == 0,
          f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    check(seq_q >= 1 and seq_kv >= 1, f"sequence lengths must be >= 1, got seq_q={seq_q}, seq_kv={seq_kv}")
    check(not causal or seq_q <= seq_kv, f"causal attention needs seq_q <= seq_kv, got {seq_q} > {seq_kv}")


def prefill_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, sm_scale: float, causal: bool
) -> torch.Tensor:
    """Flash-attention forward into ``out``; returns ``out``.

    q: [B, Hq, S_q, D]; k, v: [B, Hkv, S_kv, D] (Hq % Hkv == 0; strided views of a KV cache are fine);
    out: [B, Hq, S_q, D]. All fp16 or all fp32, last dim contiguous, 33 <= D <= 256.
    ``causal`` masks bottom-right aligned (query i sees keys <= i + S_kv - S_q) and needs S_q <= S_kv.
    Accumulation is fp32; on a GPU fp32 inputs use TF32 tensor cores.
    """
    require_triton(q)
    _check_args(q, k, v, out, causal)
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_kv = k.shape[1], k.shape[2]
    block_d = next_power_of_2(head_dim)
    config = LAUNCH_CONFIGS.get((q.dtype, block_d))
    check(config is not None, f"head_dim {head_dim} unsupported: need 33 <= head_dim <= 256")
    block_m, block_n, num_warps, num_stages = config
    grid = (triton.cdiv(seq_q, block_m), batch * num_q_heads)
    _prefill_attention_kernel[grid](
        q, k, v, out, sm_scale * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_q_heads, num_q_heads // num_kv_heads, seq_q, seq_kv,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, sm_scale: float, causal: bool
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`prefill_attention_triton` (fp32 math, same layouts and masking)."""
    _check_args(q, k, v, out, causal)
    seq_q, seq_kv = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # [B, Hq, S_kv, D]
    vf = v.float().repeat_interleave(group, dim=1)  # [B, Hq, S_kv, D]
    scores = (q.float() @ kf.transpose(-1, -2)) * sm_scale  # [B, Hq, S_q, S_kv]
    if causal:
        q_pos = torch.arange(seq_q, device=q.device)[:, None] + (seq_kv - seq_q)
        visible = torch.arange(seq_kv, device=q.device)[None, :] <= q_pos  # [S_q, S_kv]
        scores = scores.masked_fill(~visible, float("-inf"))
    out.copy_(torch.softmax(scores, dim=-1) @ vf)  # [B, Hq, S_q, D]
    return out
