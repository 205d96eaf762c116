"""``QuantLinear``: a linear layer holding its weight in the standard GPTQ layout (edgelmm.checkpoint.gptq_format)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgelmm.checkpoint.gptq_format import check_format, default_g_idx, dequantize, num_groups
from edgelmm.errors import CheckpointError, ShapeMismatchError
from edgelmm.models.layers import UsesKernels


class QuantLinear(UsesKernels):
    """A linear layer stored in the standard GPTQ layout. Once the model binds its kernels, forward runs
    ``gptq_matmul`` (the fused Triton dequant-matmul on CUDA, dequantize-then-matmul on CPU); unbound, it
    dequantizes and calls ``F.linear``.

    Buffers: ``qweight`` int32 ``[K*bits/32, N]``, ``qzeros`` int32 ``[G, N*bits/32]``, ``scales`` fp16
    ``[G, N]``, ``g_idx`` int32 ``[K]`` and, with ``bias=True``, ``bias`` fp16 ``[N]``. Nothing derived is
    cached: every forward dequantizes afresh.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 checkpoint_format: str = "gptq", bias: bool = False) -> None:
        super().__init__()
        pf = check_format(bits, checkpoint_format)
        if in_features % pf or out_features % pf:
            raise ShapeMismatchError(f"in_features {in_features} and out_features {out_features} must be "
                                     f"multiples of {pf} at {bits} bits")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        g = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features // pf, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(g, out_features // pf, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(g, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", default_g_idx(in_features, group_size))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)

    @classmethod
    def from_state(cls, prefix: str, state_dict: dict[str, torch.Tensor], bits: int, group_size: int,
                   checkpoint_format: str = "gptq") -> QuantLinear:
        """Build from ``state_dict[prefix + "qweight" | "qzeros" | "scales" | "g_idx" | "bias"]``.

        ``prefix`` includes the trailing dot (e.g. ``"model.layers.0.mlp.fc1."``). A missing ``g_idx``
        means the trivial one; a missing ``bias`` means none. Shapes are checked against ``qweight``. The
        tensors are used as they are (no copy); ``scales`` and ``bias`` keep their float dtype.
        """
        pf = check_format(bits, checkpoint_format)
        missing = [prefix + n for n in ("qweight", "qzeros", "scales") if prefix + n not in state_dict]
        if missing:
            raise CheckpointError(f"GPTQ tensors missing from the checkpoint: {', '.join(missing)}")
        qweight = state_dict[f"{prefix}qweight"]  # [K/pf, N]
        bias = state_dict.get(f"{prefix}bias")
        layer = cls(qweight.shape[0] * pf, qweight.shape[1], bits, group_size, checkpoint_format,
                    bias=bias is not None)
        for name, buf in list(layer.named_buffers()):
            tensor = state_dict.get(prefix + name, buf)
            if tensor.shape != buf.shape:
                raise ShapeMismatchError(f"{prefix}{name} has shape {tuple(tensor.shape)}, expected "
                                         f"{tuple(buf.shape)} for a {bits}-bit g{group_size} linear")
            setattr(layer, name, tensor if tensor.is_floating_point() else tensor.to(buf.dtype))
        return layer

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` (``nn.Linear`` orientation)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                          self.checkpoint_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]``: ``x @ W.T + bias`` in ``x``'s dtype."""
        if self.ops is None:
            weight = self.dequantize().to(x.dtype)  # [N, K]
            bias = None if self.bias is None else self.bias.to(x.dtype)  # [N]
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, self.in_features)  # (M, K)
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype, device=x.device)  # (M, N)
        self.ops.gptq_matmul(rows, self.qweight, self.qzeros, self.scales.to(x.dtype), self._g_idx_arg(),
                             None if self.bias is None else self.bias.to(x.dtype), out, bits=self.bits,
                             group_size=self.group_size, zero_v1=self.checkpoint_format == "gptq")
        return out.view(*x.shape[:-1], self.out_features)

    def _g_idx_arg(self) -> torch.Tensor | None:
        """None when g_idx is the trivial ``i // group_size`` (the kernels' faster path); decided once."""
        if not hasattr(self, "_trivial_g_idx"):
            group = self.in_features if self.group_size == -1 else self.group_size
            self._trivial_g_idx = torch.equal(self.g_idx.long().cpu(), torch.arange(self.in_features) // group)
        return None if self._trivial_g_idx else self.g_idx

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, checkpoint_format={self.checkpoint_format!r}")
