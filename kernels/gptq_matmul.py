"""GPTQ dequant-matmul reading the standard AutoGPTQ/GPTQModel packing directly.

Packing (docs/quant-formats.md §1): qweight int32 [K*b/32, N] packs input rows along K, lowest k in the
least-significant bits; qzeros int32 [G, N*b/32] packs along N; scales [G, N]; g_idx int32 [K].
v1 ("gptq") checkpoints store zero - 1, v2 ("gptq_v2") store zero. Dequantization (§1.5):
    W_T[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]),   y = x @ W_T + bias
The kernel has a GEMV path (M = 1, reduction without tensor cores) and a GEMM path (tl.dot); both are the
same kernel under the ``IS_GEMV`` constexpr. ``g_idx=None`` means the trivial ``k // group_size`` (no
act-order): the kernel then loads one scale/zero row per K block instead of gathering per input row.
"""

import torch

from edgelmm.kernels._common import check, check_tensor, require_triton, tl, triton

# (IS_GEMV, BITS, HAS_G_IDX, dtype of x) -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); launched
# with HAS_BIAS in {False, True}; tests/kernels/test_compile.py compiles each entry. BLOCK_K = 32 divides the
# group sizes 32/64/128 (-1 = K needs K % 32 == 0), so on the HAS_G_IDX=False path a K block never straddles
# two groups (G = ceil(K / group) allows a partial last group).
LAUNCH_CONFIGS = {
    (is_gemv, bits, has_g_idx, dtype): (1, 64, 32, 4, 3) if is_gemv else (32, 64, 32, 4, 3)
    for is_gemv in (True, False)
    for bits in (4, 8)
    for has_g_idx in (False, True)
    for dtype in (torch.float16, torch.float32)
}


@triton.jit(do_not_specialize=["M", "zero_offset"])
def _gptq_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, zero_offset,  # zero_offset: 1 for v1 checkpoints (stored zero - 1), 0 for v2
    stride_xm, stride_qwk, stride_qzg, stride_sg, stride_om,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, IS_GEMV: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    zero_shift = (offs_n % PACK) * BITS  # [BLOCK_N] position of column n inside its qzeros word

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_idx = k0 + offs_k
        k_mask = k_idx < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_idx[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        wk_mask = k_mask[:, None] & n_mask[None, :]
        packed = tl.load(qweight_ptr + (k_idx // PACK)[:, None] * stride_qwk + offs_n[None, :],
                         mask=wk_mask, other=0)  # [BLOCK_K, BLOCK_N] int32
        q = (packed >> ((k_idx % PACK) * BITS)[:, None]) & MASK
        if HAS_G_IDX:
            group = tl.load(g_idx_ptr + k_idx, mask=k_mask, other=0)  # [BLOCK_K]
            scale = tl.load(scales_ptr + group[:, None] * stride_sg + offs_n[None, :],
                            mask=wk_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
            qz = tl.load(qzeros_ptr + group[:, None] * stride_qzg + (offs_n // PACK)[None, :],
                         mask=wk_mask, other=0)  # [BLOCK_K, BLOCK_N]
            zero = ((qz >> zero_shift[None, :]) + zero_offset) & MASK
        else:
            group = k0 // group_size
            scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0)  # [BLOCK_N]
            scale = scale[None, :]  # [1, BLOCK_N]
            qz = tl.load(qzeros_ptr + group * stride_qzg + offs_n // PACK, mask=n_mask, other=0)  # [BLOCK_N]
            zero = (((qz >> zero_shift) + zero_offset) & MASK)[None, :]  # [1, BLOCK_N]
        w = (q - zero).to(tl.float32) * scale.to(tl.float32)  # [BLOCK_K, BLOCK_N]
        if IS_GEMV:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _check_args(x, qweight, qzeros, scales, g_idx, bias, out, bits, group_size):
    check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    pack = 32 // bits
    check(x.dim() == 2, f"x must be [M, K] (flatten leading dims), got shape {tuple(x.shape)}")
    check(qweight.dim() == 2 and scales.dim() == 2, "qweight must be [K*bits/32, N] and scales [G, N]")
    m, k = x.shape
    n, num_groups = qweight.shape[1], scales.shape[0]
    check(k % pack == 0 and n % pack == 0,
          f"K ({k}) and N ({n}) must be multiples of {pack} for {bits}-bit packing")
    check_tensor("x", x, (m, k), (torch.float16, torch.float32), x.device)
    check_tensor("qweight", qweight, (k // pack, n), (torch.int32,), x.device)
    check_tensor("qzeros", qzeros, (num_groups, n // pack), (torch.int32,), x.device)
    check_tensor("scales", scales, (num_groups, n), (torch.float16, torch.float32), x.device)
    check_tensor("out", out, (m, n), (x.dtype,), x.device)
    if bias is not None:
        check_tensor("bias", bias, (n,), (torch.float16, torch.float32), x.device)
    if g_idx is not None:
        check_tensor("g_idx", g_idx, (k,), (torch.int32,), x.device)
        check(g_idx.is_contiguous(), "g_idx must be contiguous")
    else:
        group = k if group_size == -1 else group_size
        check(group > 0 and num_groups == -(-k // group),
              f"group_size {group_size} does not match K={k} and {num_groups} scale rows "
              "(need G = ceil(K / group))")


def gptq_matmul_triton(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
    g_idx: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor, *,
    bits: int, group_size: int, zero_v1: bool,
) -> torch.Tensor:
    """``out = x @ dequantize(qweight, qzeros, scales, g_idx) + bias``; returns ``out``.

    x: [M, K] fp16/fp32; qweight int32 [K*bits/32, N]; qzeros int32 [G, N*bits/32]; scales [G, N];
    g_idx int32 [K] or None for the trivial ``k // group_size`` (decide once at load time, e.g. with
    :func:`is_trivial_g_idx`); bias [N] or None; out: [M, N] in x's dtype. bits: 4 or 8;
    group_size: 32/64/128 or -1 (one group over K; used only when g_idx is None); zero_v1: True for
    ``checkpoint_format == "gptq"`` (stored zero - 1), False for ``"gptq_v2"``. M = 1 takes the GEMV path.
    Accumulation is fp32; the GEMM path feeds the dot x's dtype (fp16, or TF32 for fp32 on a GPU).
    """
    require_triton(x)
    _check_args(x, qweight, qzeros, scales, g_idx, bias, out, bits, group_size)
    m, k = x.shape
    n = qweight.shape[1]
    group = k if group_size == -1 else group_size
    is_gemv = m == 1
    config = LAUNCH_CONFIGS[(is_gemv, bits, g_idx is not None, x.dtype)]
    block_m, block_n, block_k, num_warps, num_stages = config
    check(g_idx is not None or group % block_k == 0,
          f"group size {group} is not a multiple of {block_k}; pass g_idx = arange(K) // group_size")
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gptq_matmul_kernel[grid](
        x, qweight, qzeros, scales, qweight if g_idx is None else g_idx, out if bias is None else bias, out,
        m, n, k, group, 1 if zero_v1 else 0,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None, IS_GEMV=is_gemv,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def dequantize_ref(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, *,
    bits: int, group_size: int, zero_v1: bool,
) -> torch.Tensor:
    """The §1.5 reference dequantization: returns W_T fp32 [K, N] (the nn.Linear weight is W_T.T)."""
    pack, mask = 32 // bits, (1 << bits) - 1
    k, n = qweight.shape[0] * pack, qweight.shape[1]
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)  # [pack]
    q = (qweight[:, None, :] >> shifts[None, :, None]) & mask  # [K/pack, pack, N]
    z = (qzeros[:, :, None] >> shifts[None, None, :]) & mask  # [G, N/pack, pack]
    q, z = q.reshape(k, n), z.reshape(qzeros.shape[0], n)  # [K, N], [G, N]
    if zero_v1:
        z = (z + 1) & mask
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // (k if group_size == -1 else group_size)  # [K]
    g_idx = g_idx.long()
    return scales.float()[g_idx] * (q - z[g_idx]).float()  # [K, N]


def gptq_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
    g_idx: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor, *,
    bits: int, group_size: int, zero_v1: bool,
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`gptq_matmul_triton`: dequantize_ref, then an fp32 matmul."""
    _check_args(x, qweight, qzeros, scales, g_idx, bias, out, bits, group_size)
    y = x.float() @ dequantize_ref(qweight, qzeros, scales, g_idx, bits=bits, group_size=group_size,
                                   zero_v1=zero_v1)  # [M, N]
    if bias is not None:
        y += bias.float()
    out.copy_(y)
    return out


def is_trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True if g_idx equals ``arange(K) // group_size`` (no act-order), so None can be passed instead."""
    k = g_idx.shape[0]
    group = k if group_size == -1 else group_size
    return bool(torch.equal(g_idx.long().cpu(), torch.arange(k) // group))
