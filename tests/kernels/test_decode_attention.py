"""Decode attention (split-KV, grouped GQA, fp16/fp32/int8 KV): Triton (interpreter) vs the torch reference
and vs torch SDPA over the valid part of the cache.

Tolerances: fp32 atol=rtol=2e-5; fp16 atol=rtol=2e-3 (vs reference and SDPA on the same KV values).
int8 KV: Triton vs the int8 reference (same dequantized values) at the fp16 tolerance; and the int8-KV output
vs the unquantized-KV output: max abs difference < 0.04 and mean < 0.008 (per-token absmax/127 scales on
N(0, 1) data give half-steps of ~0.012-0.02; the output mixes such errors; observed max ~0.02, mean ~0.003).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testutil import assert_close

from edgelmm.kernels.decode_attention import decode_attention_ref, quantize_kv_int8

triton = pytest.importorskip("triton")
from edgelmm.kernels.decode_attention import decode_attention_triton

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}

# (q heads, kv heads, kv_lens per batch, head_dim, num_splits): Phi-2 MHA (80), Gemma MQA (256, group 8),
# GQA group 4 (128), a group of 32 (> BLOCK_H: two head blocks), length 1, splits longer than the cache.
CASES = [
    (4, 4, [17], 80, 4),
    (8, 1, [1025, 3], 256, 8),
    (8, 2, [729, 577], 128, 5),
    (32, 1, [40], 64, 2),
    (2, 2, [1, 2], 64, 3),
    (4, 2, [5], 96, 16),
]


def _problem(hq, hkv, kv_lens, head_dim, num_splits, dtype, max_seq=None):
    batch = len(kv_lens)
    max_seq = max_seq or max(kv_lens) + 7  # the cache is longer than any sequence
    q = torch.randn(batch, hq, head_dim, dtype=dtype)  # [B, Hq, D]
    k = torch.randn(batch, hkv, max_seq, head_dim, dtype=dtype)  # [B, Hkv, S_max, D]
    v = torch.randn(batch, hkv, max_seq, head_dim, dtype=dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    part_out = torch.full((batch, hq, num_splits, head_dim), float("nan"))  # fp32 workspace
    part_lse = torch.full((batch, hq, num_splits), float("nan"))
    return q, k, v, lens, part_out, part_lse


def _sdpa(q, k, v, kv_lens, sm_scale):
    """Independent oracle: SDPA of each sequence's single query over its valid cache prefix."""
    outs = []
    for b, n in enumerate(kv_lens.tolist()):
        qb = q[b, :, None].float()  # [Hq, 1, D]
        o = F.scaled_dot_product_attention(qb, k[b, :, :n].float(), v[b, :, :n].float(), scale=sm_scale,
                                           enable_gqa=True)  # [Hq, 1, D]
        outs.append(o[:, 0])
    return torch.stack(outs)  # [B, Hq, D]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("hq,hkv,kv_lens,head_dim,num_splits", CASES)
def test_decode_matches_reference_and_sdpa(hq, hkv, kv_lens, head_dim, num_splits, dtype):
    q, k, v, lens, part_out, part_lse = _problem(hq, hkv, kv_lens, head_dim, num_splits, dtype)
    scale = head_dim**-0.5
    out = decode_attention_triton(q, k, v, lens, torch.full_like(q, float("nan")), scale,
                                  part_out=part_out, part_lse=part_lse)
    tol = TOL[dtype]
    assert_close(out, decode_attention_ref(q, k, v, lens, torch.empty_like(q), scale), atol=tol, rtol=tol)
    assert_close(out, _sdpa(q, k, v, lens, scale), atol=tol, rtol=tol)
    # The stage-1 partial LSEs must combine to each row's true log-sum-exp of the scores.
    group = hq // hkv
    for b, n in enumerate(kv_lens):
        scores = torch.einsum("hd,hsd->hs", q[b].float(),
                              k[b, :, :n].float().repeat_interleave(group, 0)) * scale  # [Hq, n]
        assert_close(torch.logsumexp(part_lse[b], dim=-1), torch.logsumexp(scores, dim=-1),
                     atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("hq,hkv,kv_lens,head_dim,num_splits", [CASES[0], CASES[1], CASES[2], CASES[4]])
def test_decode_int8_kv(hq, hkv, kv_lens, head_dim, num_splits, dtype):
    q, k, v, lens, part_out, part_lse = _problem(hq, hkv, kv_lens, head_dim, num_splits, dtype)
    scale = head_dim**-0.5
    k8, k_scale = quantize_kv_int8(k)  # int8 [B, Hkv, S_max, D], fp32 [B, Hkv, S_max]
    v8, v_scale = quantize_kv_int8(v)
    k_scale = k_scale.half()  # the cache may keep its scales in fp16
    out8 = decode_attention_triton(q, k8, v8, lens, torch.empty_like(q), scale, k_scale=k_scale,
                                   v_scale=v_scale, part_out=part_out, part_lse=part_lse)
    ref8 = decode_attention_ref(q, k8, v8, lens, torch.empty_like(q), scale, k_scale=k_scale, v_scale=v_scale)
    assert_close(out8, ref8, atol=2e-3, rtol=2e-3)

    out_fp = decode_attention_triton(q, k, v, lens, torch.empty_like(q), scale, part_out=part_out,
                                     part_lse=part_lse)  # unquantized KV
    assert_close(out_fp, _sdpa(q, k, v, lens, scale), atol=TOL[dtype], rtol=TOL[dtype])
    err = (out8.float() - out_fp.float()).abs()  # [B, Hq, D]
    assert err.max().item() < 0.04, f"int8-KV max error {err.max()}"
    assert err.mean().item() < 0.008, f"int8-KV mean error {err.mean()}"


def test_decode_rejects_bad_arguments():
    q, k, v, lens, part_out, part_lse = _problem(4, 2, [9], 64, 2, torch.float16)
    with pytest.raises(ValueError, match="kv_lens dtype"):
        decode_attention_triton(q, k, v, lens.long(), torch.empty_like(q), 0.1, part_out=part_out,
                                part_lse=part_lse)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        decode_attention_triton(q, k.to(torch.int8), v.to(torch.int8), lens, torch.empty_like(q), 0.1,
                                part_out=part_out, part_lse=part_lse)
    with pytest.raises(ValueError, match="part_out dim 2"):
        decode_attention_triton(q, k, v, lens, torch.empty_like(q), 0.1, part_out=part_out[:, :, :1],
                                part_lse=part_lse)
    with pytest.raises(ValueError, match="workspaces are required"):
        decode_attention_triton(q, k, v, lens, torch.empty_like(q), 0.1)
