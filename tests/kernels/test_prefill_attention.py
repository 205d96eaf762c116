"""Prefill attention: Triton (interpreter) vs the torch reference and vs torch SDPA.

Tolerances (inputs ~N(0, 1), outputs |o| < ~3): fp32 atol=rtol=2e-5 vs reference; fp16 atol=rtol=2e-3
(fp16 output rounding plus fp16 P@V operands); cosine similarity > 1 - 1e-5 throughout.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testutil import assert_close

from edgelmm.kernels.prefill_attention import prefill_attention_ref

triton = pytest.importorskip("triton")
from edgelmm.kernels.prefill_attention import prefill_attention_triton

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}

FP16, FP32 = torch.float16, torch.float32
# (batch, q heads, kv heads, seq, head_dim, causal, dtype): text prefill (Phi-2 80, Gemma 256 MQA, GQA
# 64/96/128)
# and vision towers (CLIP 64 @ 577, SigLIP 72 @ 729, EVA 88 @ 1025); long lengths on tiny B/H. The
# interpreter's fp16 dot is ~5x slower than fp32, so the 729/1025 vision cases run in fp32 only.
CASES = [
    (2, 4, 4, 1, 64, True, FP16), (2, 4, 4, 1, 64, True, FP32),
    (1, 4, 1, 17, 80, True, FP16), (1, 4, 1, 17, 80, True, FP32),
    (2, 4, 2, 17, 96, True, FP16), (2, 4, 2, 17, 96, True, FP32),
    (1, 2, 1, 65, 256, True, FP16), (1, 2, 1, 65, 256, True, FP32),
    (1, 2, 2, 17, 80, False, FP16), (1, 2, 2, 17, 80, False, FP32),
    (1, 2, 2, 577, 64, False, FP16), (1, 2, 2, 577, 64, False, FP32),
    (1, 1, 1, 729, 72, False, FP32),
    (1, 1, 1, 1025, 88, False, FP32),
    (1, 1, 1, 1025, 128, True, FP16), (1, 2, 1, 1025, 128, True, FP32),
]


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True)


def _case_id(case):
    batch, hq, hkv, seq, head_dim, causal, dtype = case
    kind = "causal" if causal else "full"
    return f"B{batch}-Hq{hq}-Hkv{hkv}-S{seq}-D{head_dim}-{kind}-{'fp16' if dtype == FP16 else 'fp32'}"


@pytest.mark.parametrize("batch,hq,hkv,seq,head_dim,causal,dtype", CASES, ids=[_case_id(c) for c in CASES])
def test_prefill_matches_reference_and_sdpa(batch, hq, hkv, seq, head_dim, causal, dtype):
    q = torch.randn(batch, hq, seq, head_dim, dtype=dtype)  # [B, Hq, S, D]
    k = torch.randn(batch, hkv, seq, head_dim, dtype=dtype)  # [B, Hkv, S, D]
    v = torch.randn(batch, hkv, seq, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    out = prefill_attention_triton(q, k, v, torch.full_like(q, float("nan")), scale, causal)
    ref = prefill_attention_ref(q, k, v, torch.empty_like(q), scale, causal)
    tol = TOL[dtype]
    assert_close(out, ref, atol=tol, rtol=tol)
    assert_close(out, _sdpa(q, k, v, causal), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_prefill_chunk_after_cached_prefix_on_strided_cache(dtype):
    """Queries appended after a 83-token prefix attend to the prefix (bottom-right causal), reading K/V from
    a strided view of a [B, Hkv, S_max, D] cache and writing a strided view of a larger output."""
    batch, hq, hkv, seq_q, seq_kv, max_seq, head_dim = 1, 4, 2, 17, 100, 128, 80
    cache_k = torch.randn(batch, hkv, max_seq, head_dim, dtype=dtype)
    cache_v = torch.randn(batch, hkv, max_seq, head_dim, dtype=dtype)
    k, v = cache_k[:, :, :seq_kv], cache_v[:, :, :seq_kv]  # non-contiguous views
    q = torch.randn(batch, seq_q, hq, head_dim, dtype=dtype).transpose(1, 2)  # [B, Hq, S_q, D], strided
    out = torch.zeros(batch, seq_q, hq, head_dim, dtype=dtype).transpose(1, 2)  # [B, Hq, S_q, D] strided
    prefill_attention_triton(q, k, v, out, head_dim**-0.5, True)
    visible = torch.ones(seq_q, seq_kv, dtype=torch.bool).tril(diagonal=seq_kv - seq_q)  # [S_q, S_kv]
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible,
                                              scale=head_dim**-0.5, enable_gqa=True)
    tol = TOL[dtype]
    assert_close(out, expected, atol=tol, rtol=tol)
    assert_close(prefill_attention_ref(q, k, v, torch.empty_like(q), head_dim**-0.5, True), expected,
                 atol=tol, rtol=tol)


@pytest.mark.parametrize("bad,match", [
    ({"head_dim": 300}, "head_dim"),
    ({"hkv": 3}, "multiple of KV heads"),
    ({"k_dtype": torch.float32}, "k dtype"),
    ({"seq_kv": 8}, "seq_q <= seq_kv"),
])
def test_prefill_rejects_bad_arguments(bad, match):
    head_dim = bad.get("head_dim", 64)
    q = torch.randn(1, 4, 16, head_dim, dtype=torch.float16)
    k_shape = (1, bad.get("hkv", 2), bad.get("seq_kv", 16), head_dim)
    k = torch.randn(k_shape, dtype=bad.get("k_dtype", torch.float16))
    with pytest.raises(ValueError, match=match):
        prefill_attention_triton(q, k, k, torch.empty_like(q), 0.1, True)
