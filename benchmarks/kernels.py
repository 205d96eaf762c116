"""Time each Triton kernel against its torch baseline on a GPU and report achieved memory bandwidth.

    python benchmarks/kernels.py            # Phi-2-sized shapes (hidden 2560, 32 heads x 80)

Baselines: SDPA for attention, dequantize-then-matmul for GPTQ, the fp32 torch references for norms and
rotary. GB/s counts the bytes each op must move at least once (inputs read + outputs written).
Without a CUDA GPU it says so and exits 0.
"""

import sys

import torch
import torch.nn.functional as F


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cases(dev: torch.device):
    from edgelmm.kernels import decode_attention as dec
    from edgelmm.kernels import gptq_matmul as gq
    from edgelmm.kernels import norms, rotary
    from edgelmm.kernels import prefill_attention as pre

    h16 = {"device": dev, "dtype": torch.float16}
    heads, head_dim, hidden, scale = 32, 80, 2560, 80**-0.5

    # Prefill: 1024 tokens (text + 577 image tokens), causal, MHA.
    q, k, v = (torch.randn(1, heads, 1024, head_dim, **h16) for _ in range(3))  # [B, H, S, D]
    o = torch.empty_like(q)
    yield ("prefill_attention S=1024 causal", _nbytes(q, k, v, o),
           lambda: pre.prefill_attention_triton(q, k, v, o, scale, True),
           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    # Decode: batch 1 over a 2048-token cache, fp16 and int8 KV.
    kc, vc = (torch.randn(1, heads, 2048, head_dim, **h16) for _ in range(2))  # [B, Hkv, S_max, D]
    qd, od = torch.randn(1, heads, head_dim, **h16), torch.empty(1, heads, head_dim, **h16)  # [B, Hq, D]
    lens = torch.full((1,), 2048, device=dev, dtype=torch.int32)
    ws = {"part_out": torch.empty(1, heads, 16, head_dim, device=dev),  # [B, Hq, splits, D] fp32
          "part_lse": torch.empty(1, heads, 16, device=dev)}
    sdpa_decode = lambda: F.scaled_dot_product_attention(qd[:, :, None], kc, vc)
    yield ("decode_attention fp16 KV=2048", _nbytes(kc, vc, qd, od),
           lambda: dec.decode_attention_triton(qd, kc, vc, lens, od, scale, **ws), sdpa_decode)
    (k8, ks), (v8, vs) = dec.quantize_kv_int8(kc), dec.quantize_kv_int8(vc)
    yield ("decode_attention int8 KV=2048", _nbytes(k8, v8, ks, vs, qd, od),
           lambda: dec.decode_attention_triton(qd, k8, v8, lens, od, scale, k_scale=ks, v_scale=vs, **ws),
           sdpa_decode)

    # GPTQ 4-bit, group 128, [2560 -> 2560]: decode GEMV and a 512-token prefill GEMM.
    qweight = torch.randint(-2**31, 2**31 - 1, (hidden // 8, hidden), device=dev, dtype=torch.int32)
    qzeros = torch.full((hidden // 128, hidden // 8), 0x77777777, device=dev, dtype=torch.int32)
    scales = torch.rand(hidden // 128, hidden, **h16) * 0.01
    gkw = {"bits": 4, "group_size": 128, "zero_v1": True}
    for rows in (1, 512):
        x, out = torch.randn(rows, hidden, **h16), torch.empty(rows, hidden, **h16)
        yield (f"gptq_matmul 4-bit g128 M={rows}", _nbytes(x, qweight, qzeros, scales, out),
               lambda x=x, out=out: gq.gptq_matmul_triton(x, qweight, qzeros, scales, None, None, out, **gkw),
               lambda x=x: x @ gq.dequantize_ref(qweight, qzeros, scales, None, **gkw).half())

    # Residual + RMSNorm over 1024 tokens; partial rotary (32 of 80) on q.
    xs, res, w = torch.randn(1024, hidden, **h16), torch.randn(1024, hidden, **h16), torch.ones(hidden, **h16)
    on = torch.empty_like(xs)
    yield ("rms_norm + residual 1024x2560", _nbytes(xs, res, on, res),
           lambda: norms.rms_norm_triton(xs, w, on, 1e-5, residual=res, residual_out=res),
           lambda: norms.rms_norm_ref(xs, w, on, 1e-5, residual=res, residual_out=res))
    cos, sin = torch.randn(1, 1024, 32, device=dev), torch.randn(1, 1024, 32, device=dev)
    yield ("rotary 32/80 in place S=1024", 2 * _nbytes(q[..., :32]) + _nbytes(cos, sin),
           lambda: rotary.rotary_triton(q, cos, sin, q, 32), lambda: rotary.rotary_ref(q, cos, sin, q, 32))


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none found); nothing to do.")
        return 0
    from triton.testing import do_bench

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}")
    print(f"{'kernel':36s} {'triton ms':>10s} {'GB/s':>8s} {'baseline ms':>12s} {'GB/s':>8s} {'speedup':>8s}")
    for name, nbytes, triton_fn, baseline_fn in _cases(dev):
        t_ms, b_ms = do_bench(triton_fn), do_bench(baseline_fn)
        print(f"{name:36s} {t_ms:10.4f} {_gbps(nbytes, t_ms):8.1f} {b_ms:12.4f} {_gbps(nbytes, b_ms):8.1f} "
              f"{b_ms / t_ms:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
