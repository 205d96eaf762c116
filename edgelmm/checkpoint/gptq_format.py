"""The standard GPTQ checkpoint layout (AutoGPTQ / GPTQModel / optimum): packing, unpacking, dequantization.

Notation: K = in_features, N = out_features, b = bits, pf = 32 // b values per int32 word, G = number of
groups (ceil(K / group_size); group_size -1 means one group of K).

Per quantized linear a checkpoint holds:

- ``qweight`` int32 ``[K / pf, N]``: packed along K; input row ``k`` sits in bits ``b*(k % pf)`` of word
  row ``k // pf`` (lowest k in the least-significant bits).
- ``qzeros`` int32 ``[G, N / pf]``: packed the same way along N. ``"gptq"`` (v1) stores ``zero - 1``,
  ``"gptq_v2"`` stores ``zero``.
- ``scales`` fp16 ``[G, N]``, ``g_idx`` int32 ``[K]`` (the group of each input row), optional ``bias [N]``.

Dequantization: ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.
"""

import torch

from edgelmm.errors import ConfigError, ShapeMismatchError

SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def check_format(bits: int, checkpoint_format: str = "gptq") -> int:
    """Validate ``bits`` and ``checkpoint_format``; return the pack factor 32 // bits."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConfigError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    return 32 // bits


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers ``[R, C]`` along R into int32 words ``[R / pf, C]``."""
    pf = 32 // bits
    rows, cols = values.shape
    if rows % pf:
        raise ShapeMismatchError(f"cannot pack {rows} rows at {bits} bits: not a multiple of {pf}")
    v = values.to(torch.int64).reshape(rows // pf, pf, cols)  # [R/pf, pf, C]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device)  # [pf]
    words = (v << shifts[None, :, None]).sum(dim=1)  # [R/pf, C], each in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: int32 ``[R / pf, C]`` -> int64 ``[R, C]`` in ``[0, 2^bits)``."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=words.device)  # [pf]
    w = words.to(torch.int64) & 0xFFFFFFFF  # [R/pf, C], as unsigned
    v = (w[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)  # [R/pf, pf, C]
    return v.reshape(-1, words.shape[1])  # [R, C]


def _check_range(values: torch.Tensor, low: int, high: int, what: str) -> None:
    if values.numel() and (values.min() < low or values.max() > high):
        found = f"[{int(values.min())}, {int(values.max())}]"
        raise ValueError(f"{what} must lie in [{low}, {high}], got {found}")


def pack_qweight(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer weights ``[K, N]`` (values in ``[0, 2^bits)``) into int32 ``qweight [K*bits/32, N]``."""
    check_format(bits)
    _check_range(intweight, 0, 2**bits - 1, "intweight")
    return _pack_rows(intweight, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack ``qweight`` int32 ``[K*bits/32, N]`` into integer weights int64 ``[K, N]``."""
    check_format(bits)
    return _unpack_rows(qweight, bits)


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Pack zero points ``[G, N]`` into ``qzeros`` int32 ``[G, N*bits/32]``.

    ``"gptq_v2"`` stores zeros in ``[0, 2^bits)`` as they are. ``"gptq"`` (v1) stores ``zero - 1``, so a
    zero of 0 cannot be written: it would become -1, which v1 readers that add 1 without masking read as
    ``2^bits``. v1 therefore accepts zeros in ``[1, 2^bits)`` only (always true for sym, whose zero is
    ``2^(bits-1)``) and raises ``ValueError`` otherwise; use ``"gptq_v2"`` for asym.
    """
    check_format(bits, checkpoint_format)
    v1 = checkpoint_format == "gptq"
    _check_range(zeros, 1 if v1 else 0, 2**bits - 1, f"zeros for checkpoint_format {checkpoint_format!r}")
    stored = zeros.to(torch.int64) - 1 if v1 else zeros  # [G, N]
    return _pack_rows(stored.t(), bits).t().contiguous()  # [G, N/pf]


def unpack_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Unpack ``qzeros`` int32 ``[G, N*bits/32]`` into zero points int64 ``[G, N]``.

    For v1 this adds 1 and masks with ``2^bits - 1``, as the reference readers do (§1.5).
    """
    check_format(bits, checkpoint_format)
    stored = _unpack_rows(qzeros.t(), bits).t()  # [G, N]
    return (stored + 1) & (2**bits - 1) if checkpoint_format == "gptq" else stored


def dequantize_unpacked(
    intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """``W[n, k] = scales[g_idx[k], n] * (intweight[k, n] - zeros[g_idx[k], n])`` as float32 ``[N, K]``.

    ``intweight [K, N]``, ``zeros [G, N]``, ``scales [G, N]``, ``g_idx [K]``.
    """
    g = g_idx.long()  # [K]
    diff = (intweight.to(torch.int64) - zeros.to(torch.int64)[g]).float()  # [K, N]
    return (scales.float()[g] * diff).t()  # [N, K]


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """Dequantize packed GPTQ tensors into a float32 weight ``[N, K]`` (``nn.Linear`` orientation).

    The result is the transpose of the ``[K, N]`` matrix of §1.5, so ``y = x @ W.T + bias``. Arithmetic
    is done in float32; the products of fp16 scales and small integers are exact there.
    """
    pf = check_format(bits, checkpoint_format)
    k, n = qweight.shape[0] * pf, qweight.shape[1]
    g = scales.shape[0]
    expected = {"qzeros": (g, n // pf), "scales": (g, n), "g_idx": (k,)}
    actual = {"qzeros": tuple(qzeros.shape), "scales": tuple(scales.shape), "g_idx": tuple(g_idx.shape)}
    if n % pf or actual != expected:
        raise ShapeMismatchError(f"GPTQ tensors do not fit qweight {tuple(qweight.shape)}: "
                                 f"expected {expected}, got {actual}")
    if k and (g_idx.min() < 0 or g_idx.max() >= g):
        raise ShapeMismatchError(f"g_idx must index the {g} groups of scales, got range "
                                 f"[{int(g_idx.min())}, {int(g_idx.max())}]")
    intweight = unpack_qweight(qweight, bits)  # [K, N]
    zeros = unpack_qzeros(qzeros, bits, checkpoint_format)  # [G, N]
    return dequantize_unpacked(intweight, zeros, scales, g_idx)  # [N, K]


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The trivial ``g_idx``: ``i // group_size`` (all zeros for ``group_size == -1``), int32 ``[K]``."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // size


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(K / group_size), or 1 for ``group_size == -1``."""
    if group_size != -1 and group_size <= 0:
        raise ConfigError(f"group_size must be positive or -1, got {group_size}")
    return 1 if group_size == -1 else -(-in_features // group_size)
