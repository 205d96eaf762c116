"""Weight quantizers for GPTQ export: round-to-nearest (RTN) and GPTQ (Frantar et al., 2022).

Both return integer weights, scales, zeros and ``g_idx`` in the layout :mod:`edgelmm.checkpoint.gptq_format` packs:
sym results pack as ``"gptq"`` (v1), asym results as ``"gptq_v2"`` (v1 cannot hold a zero of 0).
Scales are rounded to fp16 before the weights are rounded, so the stored fp16 scales reproduce exactly the
grid the quantizer used. W is ``[N, K]`` (``nn.Linear`` orientation) throughout.
"""

import math
from dataclasses import dataclass

import torch

from edgelmm.checkpoint.gptq_format import (
    SUPPORTED_BITS,
    default_g_idx,
    dequantize_unpacked,
    num_groups,
    pack_qweight,
    pack_qzeros,
)
from edgelmm.errors import ConfigError, QuantizationError


@dataclass
class QuantResult:
    """A quantized linear before packing.

    ``intweight`` int32 ``[K, N]`` in ``[0, 2^bits)``; ``scales`` float32 ``[G, N]`` (fp16-exact);
    ``zeros`` int32 ``[G, N]``; ``g_idx`` int32 ``[K]``.
    """

    intweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The quantized weight as float32 ``[N, K]``."""
        return dequantize_unpacked(self.intweight, self.zeros, self.scales, self.g_idx)

    def pack(self, bits: int, checkpoint_format: str) -> dict[str, torch.Tensor]:
        """The standard GPTQ tensors: ``qweight``, ``qzeros``, fp16 ``scales`` and ``g_idx``."""
        return {
            "qweight": pack_qweight(self.intweight, bits),  # [K*bits/32, N]
            "qzeros": pack_qzeros(self.zeros, bits, checkpoint_format),  # [G, N*bits/32]
            "scales": self.scales.to(torch.float16),  # [G, N]
            "g_idx": self.g_idx.to(torch.int32),  # [K]
        }


@dataclass
class GPTQResult(QuantResult):
    """A :class:`QuantResult` plus GPTQ's loss, sum of ``(w - q)^2 / Hinv[i, i]^2 / 2``, and the damp used."""

    loss: float = 0.0
    damp: float = 0.0


def _check_args(bits: int, group_size: int, in_features: int) -> int:
    """Validate the quantization settings; return the effective group size (K for -1)."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    num_groups(in_features, group_size)
    return in_features if group_size == -1 else group_size


def fit_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for the values ``w [N, m]`` (§1.3): float32 scale ``[N]``, int64 zero ``[N]``.

    The range always includes 0. sym: ``scale = 2 * absmax / maxq``, ``zero = 2^(bits-1)``. asym:
    ``scale = (max - min) / maxq``, ``zero = clamp(round(-min / scale), 0, maxq)``. An all-zero row gets
    the range [-1, 1]; scales are rounded to fp16 and kept at least fp16's smallest normal.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)  # [N]
    xmax = w.max(dim=1).values.clamp(min=0)  # [N]
    if sym:
        xmax = torch.maximum(-xmin, xmax)  # [N]
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)  # [N]
    scale = ((xmax - xmin) / maxq).to(torch.float16).float()  # [N]
    scale = scale.clamp(min=torch.finfo(torch.float16).tiny)
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int64)  # [N]
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq).to(torch.int64)  # [N]
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / scale) + zero, 0, maxq)`` as int64; all arguments broadcast together."""
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1).to(torch.int64)


def rtn_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> QuantResult:
    """Round-to-nearest quantization of ``w [N, K]`` with one (scale, zero) per row and group of K."""
    k = w.shape[1]
    size = _check_args(bits, group_size, k)
    w = w.float()
    scales, zeros, ints = [], [], []
    for start in range(0, k, size):
        block = w[:, start:start + size]  # [N, g]
        scale, zero = fit_grid(block, bits, sym)  # [N], [N]
        ints.append(quantize_column(block, scale[:, None], zero[:, None], bits))  # [N, g]
        scales.append(scale)
        zeros.append(zero)
    return QuantResult(
        intweight=torch.cat(ints, dim=1).t().to(torch.int32).contiguous(),  # [K, N]
        scales=torch.stack(scales),  # [G, N]
        zeros=torch.stack(zeros).to(torch.int32),  # [G, N]
        g_idx=default_g_idx(k, group_size),  # [K]
    )


def inverse_cholesky(h: torch.Tensor, damp: float, max_damp: float = 1.0) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in ``h``'s dtype, and the damp used.

    On failure the damp is multiplied by 10 and the factorization retried while ``damp <= max_damp``;
    past that :class:`QuantizationError` is raised.
    """
    if not torch.isfinite(h).all():
        raise QuantizationError("Hessian contains inf/NaN; check the calibration activations")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = torch.diag(h).mean()
    tried = []
    while damp <= max_damp:
        tried.append(damp)
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)  # [K, K] lower
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)  # [K, K]
            if info == 0:
                return upper, damp
        damp *= 10
    raise QuantizationError(f"Hessian is not positive definite even with damp {tried} (mean diag "
                            f"{float(mean_diag):.3g}); calibrate with more or more varied samples")


class GPTQ:
    """GPTQ for one linear layer: feed calibration inputs with :meth:`add_batch`, then :meth:`quantize`.

    The Hessian ``H = 2/n * sum(x x^T)`` over all n input rows is kept as a running mean in float32.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [K, K]
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate the inputs ``x [..., K]`` of the layer (every leading position is one sample)."""
        x = x.reshape(-1, self.hessian.shape[0]).to(self.hessian)  # [n, K]
        if x.shape[0] == 0:
            return
        total = self.nsamples + x.shape[0]
        self.hessian *= self.nsamples / total
        x = x * math.sqrt(2 / total)  # [n, K]
        self.hessian += x.t() @ x  # [K, K]
        self.nsamples = total

    def quantize(self, w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                 act_order: bool = False, static_groups: bool = False, damp: float = 0.01,
                 block_size: int = 128) -> GPTQResult:
        """Quantize ``w [N, K]`` column by column, compensating each rounding error on later columns.

        ``act_order`` visits columns by descending ``diag(H)``. With ``static_groups`` every group's
        (scale, zero) is fitted up front on the original columns, so ``g_idx`` stays ``i // group_size``
        even with ``act_order``; without it groups are fitted on the error-compensated columns in visiting
        order, and act-order then yields a permuted ``g_idx``. Columns never activated (``H_ii == 0``)
        are zeroed. ``damp`` is retried ×10 up to 1.0 if the Cholesky factorization fails.
        """
        n, k = w.shape
        size = _check_args(bits, group_size, k)
        if self.nsamples == 0:
            raise QuantizationError("GPTQ.quantize called before any add_batch")
        if not static_groups and size < k and size % block_size and block_size % size:
            raise ConfigError(f"group_size {size} and block_size {block_size}: one must divide the other")
        w, h = self._without_dead_columns(w)  # [N, K], [K, K]
        static = [fit_grid(w[:, s:s + size], bits, sym) for s in range(0, k, size)] if static_groups else []
        natural = torch.arange(k, device=w.device)  # [K]
        perm = torch.argsort(torch.diag(h), descending=True) if act_order else natural  # [K]
        w, h = w[:, perm], h[perm][:, perm]  # [N, K], [K, K] in visiting order
        hinv, used_damp = inverse_cholesky(h, damp)  # [K, K] upper
        q = torch.zeros(n, k, dtype=torch.int64, device=w.device)  # [N, K] in visiting order
        group_of = (perm if static_groups else natural) // size  # [K], in visiting order
        grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = dict(enumerate(static))
        loss, visit_groups = 0.0, group_of.tolist()
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            loss += self._quantize_block(w, hinv, q, visit_groups, grids, i1, i2, size, bits, sym)
        invperm = torch.argsort(perm)  # [K]
        groups = range(num_groups(k, group_size))
        return GPTQResult(
            intweight=q[:, invperm].t().to(torch.int32).contiguous(),  # [K, N]
            scales=torch.stack([grids[g][0] for g in groups]),  # [G, N]
            zeros=torch.stack([grids[g][1] for g in groups]).to(torch.int32),  # [G, N]
            g_idx=group_of[invperm].to(torch.int32),  # [K]
            loss=loss,
            damp=used_damp,
        )

    def _without_dead_columns(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 copies of ``w [N, K]`` and H ``[K, K]`` where every never-activated input column
        (``H_ii == 0``) has ``H_ii = 1`` and a zero weight."""
        w = w.detach().float().clone()  # [N, K]
        h = self.hessian.to(w.device, copy=True)  # [K, K]
        dead = torch.diag(h) == 0  # [K]
        h[dead, dead] = 1
        w[:, dead] = 0
        return w, h

    @staticmethod
    def _quantize_block(w: torch.Tensor, hinv: torch.Tensor, q: torch.Tensor, group_of: list[int],
                        grids: dict, i1: int, i2: int, size: int, bits: int, sym: bool) -> float:
        """Quantize columns ``[i1, i2)`` of ``w`` in place, then push their error onto columns ``>= i2``.

        ``w`` is updated in place, so a dynamic group fitted at its first column sees every update made
        so far; ``grids`` maps group index -> (scale, zero) and is filled here for dynamic groups.
        Returns the block's share of the GPTQ loss.
        """
        block = w[:, i1:i2]  # [N, B] view
        err = torch.zeros_like(block)  # [N, B]
        for i in range(i2 - i1):
            col = i1 + i
            if group_of[col] not in grids:
                grids[group_of[col]] = fit_grid(w[:, col:col + size], bits, sym)  # ([N], [N])
            scale, zero = grids[group_of[col]]
            column = block[:, i]  # [N]
            q[:, col] = quantize_column(column, scale, zero, bits)  # [N]
            err[:, i] = (column - scale * (q[:, col] - zero)) / hinv[col, col]  # [N]
            block[:, i:].addr_(err[:, i], hinv[col, col:i2], alpha=-1)  # [N, B - i]
        w[:, i2:] -= err @ hinv[i1:i2, i2:]  # [N, K - i2]
        return float((err**2).sum() / 2)
