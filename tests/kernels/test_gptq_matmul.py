"""GPTQ dequant-matmul: Triton (interpreter) and the torch reference vs an oracle built in this file from the
docs/quant-formats.md §1.2/§1.3/§1.5 text (pack integer weights/zeros, then W_T = scale * (q - zero) in fp64).

Tolerances vs the fp64 oracle (|y| ~ 0.1-1): fp32 atol=rtol=1e-4; fp16 atol=rtol=3e-3 (fp16 weights and
activations in the tensor-core dot, fp16 output). dequantize_ref must equal the oracle's W_T exactly.
"""

import pytest
import torch
from kernel_testutil import assert_close

from edgelmm.kernels.gptq_matmul import dequantize_ref, gptq_matmul_ref, is_trivial_g_idx

triton = pytest.importorskip("triton")
from edgelmm.kernels.gptq_matmul import gptq_matmul_triton

TOL = {torch.float32: 1e-4, torch.float16: 3e-3}
K, N = 256, 96  # N is not a multiple of the kernel's BLOCK_N: exercises the column masks


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """§1.2: pack unsigned `bits`-wide ints along `dim`, lowest index in the least-significant bits."""
    per_word = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    words = torch.zeros((v.shape[0] // per_word, *v.shape[1:]), dtype=torch.int64)
    for j in range(per_word):
        words |= (v[j::per_word] & ((1 << bits) - 1)) << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def _make_checkpoint(bits, group_size, sym, zero_v1, act_order):
    """Random GPTQ tensors plus the fp64 oracle weight W_T [K, N]."""
    maxq = (1 << bits) - 1
    group = K if group_size == -1 else group_size
    num_groups = K // group
    q = torch.randint(0, maxq + 1, (K, N))  # integer weights [K, N]
    if sym:
        zero = torch.full((num_groups, N), (maxq + 1) // 2)  # §1.3: 8 (4-bit) / 128 (8-bit)
    else:
        zero = torch.randint(0, maxq + 1, (num_groups, N))
        zero[0, :4] = 0  # the zero-point v1 stores as -1 (masked to maxq)
    scales = ((torch.rand(num_groups, N) * 0.02 + 0.001) / (maxq + 1) * 16).half()  # [G, N]; |w| < ~0.2
    g_idx = torch.arange(K) // group  # [K]
    if act_order:
        g_idx = g_idx[torch.randperm(K)]  # non-monotonic, as desc_act writes it
    stored_zero = zero - 1 if zero_v1 else zero  # §1.3: v1 stores zero - 1
    w_t = scales.double()[g_idx] * (q - zero[g_idx]).double()  # §1.5 with the true zero: [K, N]
    return _pack(q, bits, 0), _pack(stored_zero, bits, 1), scales, g_idx.to(torch.int32), w_t


# name -> (sym, zero_v1)
ZERO_MODES = {"sym-v1": (True, True), "sym-v2": (True, False), "asym-v1": (False, True),
              "asym-v2": (False, False)}


@pytest.mark.parametrize("zero_mode", list(ZERO_MODES))
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_gemv_and_gemm(bits, group_size, zero_mode):
    """Trivial g_idx (passed as None): GEMV (M=1, fp16) and GEMM (M=17, fp32, with bias) paths."""
    sym, zero_v1 = ZERO_MODES[zero_mode]
    qweight, qzeros, scales, g_idx, w_t = _make_checkpoint(bits, group_size, sym, zero_v1, act_order=False)
    kw = {"bits": bits, "group_size": group_size, "zero_v1": zero_v1}
    assert is_trivial_g_idx(g_idx, group_size)
    assert torch.equal(dequantize_ref(qweight, qzeros, scales, None, **kw).double(), w_t)
    for m, dtype, bias in ((1, torch.float16, None), (17, torch.float32, torch.randn(N))):
        x = torch.randn(m, K, dtype=dtype)
        expected = x.double() @ w_t + (0 if bias is None else bias.double())  # [M, N]
        out = gptq_matmul_triton(x, qweight, qzeros, scales, None, bias, torch.empty(m, N, dtype=dtype), **kw)
        ref = gptq_matmul_ref(x, qweight, qzeros, scales, None, bias, torch.empty(m, N, dtype=dtype), **kw)
        assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
        assert_close(ref, expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_act_order_g_idx(bits, m, dtype):
    """Non-monotonic g_idx (desc_act) is honoured on both paths; asym v2, group 32, fp16 bias."""
    qweight, qzeros, scales, g_idx, w_t = _make_checkpoint(bits, 32, sym=False, zero_v1=False, act_order=True)
    kw = {"bits": bits, "group_size": 32, "zero_v1": False}
    assert not is_trivial_g_idx(g_idx, 32)
    assert torch.equal(dequantize_ref(qweight, qzeros, scales, g_idx, **kw).double(), w_t)
    x = torch.randn(m, K, dtype=dtype)
    bias = torch.randn(N, dtype=torch.float16)
    expected = x.double() @ w_t + bias.double()  # [M, N]
    out = gptq_matmul_triton(x, qweight, qzeros, scales, g_idx, bias, torch.empty(m, N, dtype=dtype), **kw)
    assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
    ref = gptq_matmul_ref(x, qweight, qzeros, scales, g_idx, bias, torch.empty(m, N, dtype=dtype), **kw)
    assert_close(ref, expected, atol=TOL[dtype], rtol=TOL[dtype])


def test_gptq_v1_sym_checkpoint_has_the_documented_qzeros():
    """§1.3: a sym 4-bit v1 checkpoint has every qzeros nibble = 7, 8-bit every byte = 127."""
    for bits, word in ((4, 0x77777777), (8, 0x7F7F7F7F)):
        _, qzeros, *_ = _make_checkpoint(bits, 128, sym=True, zero_v1=True, act_order=False)
        assert (qzeros == word).all()


def test_gptq_rejects_bad_arguments():
    qweight, qzeros, scales, g_idx, _ = _make_checkpoint(4, 128, True, True, False)
    x, out = torch.randn(2, K, dtype=torch.float16), torch.empty(2, N, dtype=torch.float16)
    kw = {"bits": 4, "group_size": 128, "zero_v1": True}
    with pytest.raises(ValueError, match="qweight dim 0"):
        gptq_matmul_triton(x, qweight[:-1], qzeros, scales, None, None, out, **kw)
    with pytest.raises(ValueError, match="group_size 64 does not match"):
        gptq_matmul_triton(x, qweight, qzeros, scales, None, None, out, bits=4, group_size=64, zero_v1=True)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        gptq_matmul_triton(x, qweight, qzeros, scales, None, None, out, bits=3, group_size=128, zero_v1=True)
    with pytest.raises(ValueError, match="out dtype"):
        gptq_matmul_triton(x, qweight, qzeros, scales, g_idx, None, out.float(), **kw)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("m", [1, 9])
def test_gptq_reads_what_the_project_writer_packs(checkpoint_format, m):
    """Tensors packed by edgelmm.checkpoint.gptq_format (the exporter's writer), vs its dequantize. K = 4304 (SigLIP's
    MLP width) is not a multiple of 128: G = ceil(K / 128) = 34 and the last group is partial."""
    gptq_format = pytest.importorskip("edgelmm.checkpoint.gptq_format")
    k, n, bits, group = 4304, 64, 4, 128
    num_groups = -(-k // group)
    intweight = torch.randint(0, 16, (k, n))
    zeros = torch.randint(1, 16, (num_groups, n))
    scales = (torch.rand(num_groups, n) * 0.02 + 0.001).half()
    qweight = gptq_format.pack_qweight(intweight, bits)
    qzeros = gptq_format.pack_qzeros(zeros, bits, checkpoint_format)
    g_idx = gptq_format.default_g_idx(k, group)
    weight = gptq_format.dequantize(qweight, qzeros, scales, g_idx, bits, checkpoint_format)  # [N, K]
    x = torch.randn(m, k)
    expected = x.double() @ weight.double().t()  # [M, N]
    kw = {"bits": bits, "group_size": group, "zero_v1": checkpoint_format == "gptq"}
    for g in (None, g_idx):
        out = gptq_matmul_triton(x, qweight, qzeros, scales, g, None, torch.empty(m, n), **kw)
        assert_close(out, expected, atol=1e-4, rtol=1e-4)
