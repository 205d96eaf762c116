"""The GPTQ checkpoint layout against an independent numpy reading of docs/quant-formats.md §1.2-1.5."""

import numpy as np
import pytest
import torch

from edgelmm.checkpoint.gptq_format import dequantize, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from edgelmm.errors import CheckpointError, ConfigError, ShapeMismatchError
from edgelmm.models.quant_linear import QuantLinear

K, N = 256, 64
GROUP_SIZES = [32, 64, 128, -1]


# ---- independent reference (plain numpy, written from the doc; shares no code with edgelmm) ----

def ref_pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """§1.2: word[r, c] = OR_j values[r*pf + j, c] << (bits*j), as uint32."""
    pf = 32 // bits
    out = np.zeros((values.shape[0] // pf, values.shape[1]), dtype=np.uint64)
    for j in range(pf):
        out |= values[j::pf].astype(np.uint64) << np.uint64(bits * j)
    return out.astype(np.uint32)


def ref_dequantize(qweight, qzeros, scales, g_idx, bits, checkpoint_format) -> np.ndarray:
    """§1.5 verbatim: returns W_T [K, N] in float32."""
    qw = qweight.numpy().view(np.uint32)
    qz = qzeros.numpy().view(np.uint32)
    pf, mask = 32 // bits, (1 << bits) - 1
    k_dim, n_dim = qw.shape[0] * pf, qw.shape[1]
    q = np.array([(qw[k // pf] >> np.uint32(bits * (k % pf))) & mask for k in range(k_dim)], dtype=np.int64)
    z = np.stack([(qz[:, n // pf] >> np.uint32(bits * (n % pf))) & mask for n in range(n_dim)], axis=1)
    z = z.astype(np.int64)
    if checkpoint_format == "gptq":
        z = (z + 1) & mask
    gi = g_idx.numpy().astype(np.int64)
    s = scales.numpy().astype(np.float32)
    return (s[gi] * (q - z[gi]).astype(np.float32)).astype(np.float32)


# ---- fixtures ----

def make_case(bits: int, group_size: int, sym: bool, checkpoint_format: str, permuted: bool, seed: int = 0):
    """Random integer weights, zeros, fp16 scales and a (possibly permuted) g_idx."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    g = 1 if group_size == -1 else K // group_size
    intweight = torch.randint(0, maxq + 1, (K, N), generator=gen)
    if sym:
        zeros = torch.full((g, N), 2 ** (bits - 1))
    else:
        low = 1 if checkpoint_format == "gptq" else 0
        zeros = torch.randint(low, maxq + 1, (g, N), generator=gen)
        if low == 0:
            zeros[0, :3] = 0  # make sure a zero point of 0 is present
    scales = (torch.rand(g, N, generator=gen) * 0.05 + 1e-3).half()
    g_idx = torch.arange(K, dtype=torch.int32) // (K if group_size == -1 else group_size)
    if permuted:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    return intweight, zeros, scales, g_idx


CASES = [(b, gs, sym, fmt) for b in (4, 8) for gs in GROUP_SIZES
         for sym, fmt in ((True, "gptq"), (True, "gptq_v2"), (False, "gptq_v2"), (False, "gptq"))]


@pytest.mark.parametrize("bits,group_size,sym,fmt", CASES)
def test_round_trip_and_layout_are_bit_exact(bits, group_size, sym, fmt):
    intweight, zeros, _, _ = make_case(bits, group_size, sym, fmt, permuted=False)
    qweight = pack_qweight(intweight, bits)
    qzeros = pack_qzeros(zeros, bits, fmt)
    assert qweight.dtype == torch.int32 and qweight.shape == (K * bits // 32, N)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (zeros.shape[0], N * bits // 32)
    stored = (zeros.numpy() - 1) if fmt == "gptq" else zeros.numpy()
    np.testing.assert_array_equal(qweight.numpy().view(np.uint32), ref_pack_rows(intweight.numpy(), bits))
    np.testing.assert_array_equal(qzeros.numpy().view(np.uint32), ref_pack_rows(stored.T, bits).T)
    assert torch.equal(unpack_qweight(qweight, bits), intweight)
    assert torch.equal(unpack_qzeros(qzeros, bits, fmt), zeros)


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("bits,group_size,sym,fmt", CASES)
def test_dequantize_matches_reference_formula(bits, group_size, sym, fmt, permuted):
    intweight, zeros, scales, g_idx = make_case(bits, group_size, sym, fmt, permuted, seed=1)
    qweight, qzeros = pack_qweight(intweight, bits), pack_qzeros(zeros, bits, fmt)
    w = dequantize(qweight, qzeros, scales, g_idx, bits, fmt)
    assert w.shape == (N, K) and w.dtype == torch.float32
    expected = ref_dequantize(qweight, qzeros, scales, g_idx, bits, fmt)  # [K, N]
    np.testing.assert_array_equal(w.numpy(), expected.T)


def test_known_words():
    """Hand-computed words: lowest k in the least-significant bits; sym v1 zeros are 0x77777777/0x7F7F7F7F."""
    col4 = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])[:, None]  # [8, 1]
    assert pack_qweight(col4, 4).numpy().view(np.uint32)[0, 0] == 0x87654321
    col8 = torch.tensor([0x01, 0x02, 0x03, 0xFF])[:, None]  # [4, 1]
    assert pack_qweight(col8, 8).numpy().view(np.uint32)[0, 0] == 0xFF030201
    assert np.all(pack_qzeros(torch.full((2, 16), 8), 4, "gptq").numpy().view(np.uint32) == 0x77777777)
    assert np.all(pack_qzeros(torch.full((2, 16), 128), 8, "gptq").numpy().view(np.uint32) == 0x7F7F7F7F)
    assert np.all(pack_qzeros(torch.full((2, 16), 8), 4, "gptq_v2").numpy().view(np.uint32) == 0x88888888)


def test_zero_point_zero_v2_and_v1_limitation():
    zeros = torch.zeros(1, 8, dtype=torch.int64)
    zeros[0, 1] = 15
    packed = pack_qzeros(zeros, 4, "gptq_v2")
    assert packed.numpy().view(np.uint32)[0, 0] == 0x000000F0
    assert torch.equal(unpack_qzeros(packed, 4, "gptq_v2"), zeros)
    with pytest.raises(ValueError, match="gptq_v2|\\[1, 15\\]"):
        pack_qzeros(zeros, 4, "gptq")  # v1 stores zero - 1: a zero of 0 is not representable
    # A v1 word written by other tools with nibble 0xF (= -1) reads back as zero 0 with the reference mask.
    foreign = torch.tensor([[-1]], dtype=torch.int32)  # 0xFFFFFFFF
    assert unpack_qzeros(foreign, 4, "gptq").tolist() == [[0] * 8]
    assert unpack_qzeros(foreign, 4, "gptq_v2").tolist() == [[15] * 8]


def test_rejects_bad_input():
    with pytest.raises(ConfigError):
        pack_qweight(torch.zeros(32, 8, dtype=torch.int64), 3)
    with pytest.raises(ConfigError):
        pack_qzeros(torch.ones(1, 8, dtype=torch.int64), 4, "gptq_v3")
    with pytest.raises(ValueError):
        pack_qweight(torch.full((8, 8), 16), 4)
    with pytest.raises(ShapeMismatchError):
        pack_qweight(torch.zeros(12, 8, dtype=torch.int64), 4)
    intweight, zeros, scales, g_idx = make_case(4, 64, True, "gptq", permuted=False)
    qweight, qzeros = pack_qweight(intweight, 4), pack_qzeros(zeros, 4, "gptq")
    with pytest.raises(ShapeMismatchError):
        dequantize(qweight, qzeros, scales[:2], g_idx, 4, "gptq")
    with pytest.raises(ShapeMismatchError):
        dequantize(qweight, qzeros, scales, g_idx + 4, 4, "gptq")


def checkpoint(prefix: str, bits: int, group_size: int, fmt: str, bias: bool, permuted: bool):
    intweight, zeros, scales, g_idx = make_case(bits, group_size, fmt == "gptq", fmt, permuted, seed=2)
    state = {f"{prefix}qweight": pack_qweight(intweight, bits), f"{prefix}qzeros": pack_qzeros(zeros, bits, fmt),
             f"{prefix}scales": scales, f"{prefix}g_idx": g_idx}
    if bias:
        state[f"{prefix}bias"] = torch.randn(N).half()
    return state


@pytest.mark.parametrize("bits,group_size,fmt,bias", [(4, 128, "gptq", True), (8, 32, "gptq_v2", False),
                                                      (4, -1, "gptq_v2", True), (8, 64, "gptq", True)])
def test_quant_linear_forward(bits, group_size, fmt, bias):
    prefix = "model.layers.0.mlp.fc1."
    state = checkpoint(prefix, bits, group_size, fmt, bias, permuted=True)
    layer = QuantLinear.from_state(prefix, state, bits, group_size, fmt)
    w_t = torch.from_numpy(ref_dequantize(state[f"{prefix}qweight"], state[f"{prefix}qzeros"],
                                          state[f"{prefix}scales"], state[f"{prefix}g_idx"], bits, fmt))
    x = torch.randn(3, 5, K)
    expected = x @ w_t + (state[f"{prefix}bias"].float() if bias else 0)  # [3, 5, N]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert set(layer.state_dict()) == {k.removeprefix(prefix) for k in state}
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, state[prefix + name]), name


def test_quant_linear_from_state_defaults_and_errors():
    state = checkpoint("l.", 4, 64, "gptq", bias=False, permuted=False)
    del state["l.g_idx"]
    layer = QuantLinear.from_state("l.", state, 4, 64)
    assert layer.bias is None
    assert torch.equal(layer.g_idx, torch.arange(K, dtype=torch.int32) // 64)
    with pytest.raises(CheckpointError, match="l.scales"):
        QuantLinear.from_state("l.", {k: v for k, v in state.items() if k != "l.scales"}, 4, 64)
    with pytest.raises(ShapeMismatchError, match=r"expected \(2, 8\)"):
        QuantLinear.from_state("l.", state, 4, 128)  # 2 groups expected, the checkpoint has 4
