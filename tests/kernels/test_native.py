"""The CPU fast path (kernels/native.py, PyTorch's fused ops in the input dtype) against the fp32 references."""
import pytest
import torch

from edgelmm.kernels import native
from edgelmm.kernels.decode_attention import decode_attention_ref, quantize_kv_int8
from edgelmm.kernels.norms import layer_norm_ref, rms_norm_ref
from edgelmm.kernels.prefill_attention import prefill_attention_ref

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,s_q,s_kv,causal", [(4, 4, 17, 17, True), (8, 2, 5, 40, True), (4, 1, 33, 33, False)])
def test_prefill_attention(dtype, hq, hkv, s_q, s_kv, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, s_q, 64, generator=g).to(dtype)
    k, v = (torch.randn(2, hkv, s_kv, 64, generator=g).to(dtype) for _ in range(2))
    ours = native.prefill_attention_native(q, k, v, torch.empty_like(q), 0.125, causal)
    ref = prefill_attention_ref(q, k, v, torch.empty_like(q), 0.125, causal)
    torch.testing.assert_close(ours.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
def test_decode_attention_with_ragged_lengths(dtype, int8):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 8, 80, generator=g).to(dtype)
    k, v = (torch.randn(3, 2, 50, 80, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([1, 17, 50], dtype=torch.int32)
    scales = {}
    if int8:
        (k, ks), (v, vs) = quantize_kv_int8(k), quantize_kv_int8(v)
        scales = {"k_scale": ks, "v_scale": vs}
    ours = native.decode_attention_native(q, k, v, lens, torch.empty_like(q), 0.11, **scales)
    ref = decode_attention_ref(q, k, v, lens, torch.empty_like(q), 0.11, **scales)
    torch.testing.assert_close(ours.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True])
def test_norms_with_residual(dtype, gemma):
    g = torch.Generator().manual_seed(2)
    x, res = (torch.randn(2, 7, 96, generator=g).to(dtype) for _ in range(2))
    w, b = (0.1 * torch.randn(96, generator=g) + 1).to(dtype), torch.randn(96, generator=g).to(dtype)
    out_res, ref_res = res.clone(), res.clone()
    ours = native.rms_norm_native(x, w, torch.empty_like(x), 1e-6, residual=res, residual_out=out_res, gemma=gemma)
    ref = rms_norm_ref(x, w, torch.empty_like(x), 1e-6, residual=res, residual_out=ref_res, gemma=gemma)
    torch.testing.assert_close(ours.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(out_res, ref_res)
    ours = native.layer_norm_native(x, w, b, torch.empty_like(x), 1e-5)
    ref = layer_norm_ref(x, w, b, torch.empty_like(x), 1e-5)
    torch.testing.assert_close(ours.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (8, 128, True), (4, -1, False)])
def test_gptq_matmul_against_the_reference(bits, group_size, act_order, dtype):
    from edgelmm.checkpoint.gptq_format import pack_qweight, pack_qzeros
    from edgelmm.kernels.gptq_matmul import gptq_matmul_ref

    g = torch.Generator().manual_seed(3)
    k, n, m = 256, 64, 5
    groups = 1 if group_size == -1 else k // group_size
    intweight = torch.randint(0, 2**bits, (k, n), generator=g)
    zeros = torch.randint(1, 2**bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.01 + 0.001).half()
    g_idx = (torch.arange(k) // (k if group_size == -1 else group_size)).int()
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    args = (pack_qweight(intweight, bits), pack_qzeros(zeros, bits), scales, g_idx, torch.randn(n, generator=g))
    x = torch.randn(m, k, generator=g)
    if dtype == torch.float32:
        ours = native.gptq_matmul_native(x, *args, torch.empty(m, n), bits=bits, group_size=group_size, zero_v1=True)
        ref = gptq_matmul_ref(x, *args, torch.empty(m, n), bits=bits, group_size=group_size, zero_v1=True)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # independently of the shared dequantization: docs/quant-formats.md §1.5, w = scale[g] * (q - zero[g]), in fp64
    gi = g_idx.long()
    w_t = scales.double()[gi] * (intweight - zeros[gi]).double()  # [K, N]
    expected = x.double() @ w_t + args[-1].double()
    xd = x.to(dtype)
    ours = native.gptq_matmul_native(xd, *args[:2], scales.to(dtype), g_idx, args[-1].to(dtype),
                                     torch.empty(m, n, dtype=dtype), bits=bits, group_size=group_size, zero_v1=True)
    scale = expected.abs().max()
    assert (ours.double() - expected).abs().max() / scale < (1e-5 if dtype == torch.float32 else 3e-2)
