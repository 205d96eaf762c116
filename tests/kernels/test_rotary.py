"""Rotary embedding (rotate-half, partial rotary_dim): Triton (interpreter) and the torch reference vs
transformers' own ``apply_rotary_pos_emb`` applied the way HF Phi applies it (first rotary_dim dims only).

Tolerances: fp32 atol=rtol=1e-5; fp16 atol=rtol=2e-3 (one fp16 rounding of |values| < ~4).
"""

import pytest
import torch
from kernel_testutil import assert_close

from edgelmm.kernels.rotary import rotary_ref

triton = pytest.importorskip("triton")
from edgelmm.kernels.rotary import rotary_triton

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _tables(batch, seq, rotary_dim, base=10000.0, offset=0):
    """HF-style cos/sin [B, S, rotary_dim] (halves equal); sequence b sits at positions offset+3b+(0..S-1)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)  # [r/2]
    pos = torch.arange(seq, dtype=torch.float64)[None, :] + offset + 3 * torch.arange(batch)[:, None]  # [B,S]
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)  # [B, S, r]
    return emb.cos(), emb.sin()


def _hf(x, cos, sin, rotary_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = x.double()
    rot, _ = apply_rotary_pos_emb(x[..., :rotary_dim], x[..., :rotary_dim], cos, sin)  # unsqueeze_dim=1
    return torch.cat([rot, x[..., rotary_dim:]], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("heads,seq,head_dim,rotary_dim", [
    (2, 1, 80, 32),  # Phi-2 decode: partial rotary 32 of 80
    (2, 17, 80, 32),
    (1, 577, 64, 64),  # Llama-style full rotary
    (2, 5, 256, 256),  # Gemma
    (1, 3, 96, 48),
])
def test_rotary(heads, seq, head_dim, rotary_dim, in_place, dtype):
    batch = 2
    x = torch.randn(batch, heads, seq, head_dim, dtype=dtype)  # [B, H, S, D]
    cos, sin = _tables(batch, seq, rotary_dim, offset=11)  # [B, S, r] fp64
    expected = _hf(x, cos, sin, rotary_dim)
    cos, sin = cos.float(), sin.float()
    for fn in (rotary_triton, rotary_ref):
        xin = x.clone()
        out = xin if in_place else torch.full_like(x, float("nan"))
        fn(xin, cos, sin, out, rotary_dim)
        assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
        if not in_place:
            assert torch.equal(xin, x), f"{fn.__name__} modified its input"


def test_rotary_strided_q_and_broadcast_tables():
    """q as a [B, H, S, D] view of a [B, S, H, D] projection; one [1, S, r] fp16 table expanded over B."""
    batch, heads, seq, head_dim, rotary_dim = 3, 4, 9, 80, 32
    q = torch.randn(batch, seq, heads, head_dim, dtype=torch.float16).transpose(1, 2)  # strided [B, H, S, D]
    cos, sin = _tables(1, seq, rotary_dim)
    expected = _hf(q, cos, sin, rotary_dim)
    out = torch.empty(batch, heads, seq, head_dim, dtype=torch.float16)
    rotary_triton(q, cos.half().expand(batch, -1, -1), sin.half().expand(batch, -1, -1), out, rotary_dim)
    assert_close(out, expected, atol=4e-3, rtol=4e-3)  # fp16 tables add one more rounding


def test_rotary_rejects_bad_arguments():
    x = torch.randn(1, 2, 3, 80)
    cos, sin = _tables(1, 3, 32)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        rotary_triton(x, cos.float(), sin.float(), x, 31)
    with pytest.raises(ValueError, match="cos dim 2"):
        rotary_triton(x, cos.float(), sin.float(), x, 64)
    with pytest.raises(ValueError, match="cos dtype"):
        rotary_triton(x.half(), cos, sin, x.half(), 32)
