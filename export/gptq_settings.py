"""The settings of one GPTQ export and the ``quantization_config`` they produce (docs/quant-formats.md §1.6)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from edgelmm import __version__
from edgelmm.checkpoint.gptq_format import SUPPORTED_BITS
from edgelmm.errors import ConfigError

GROUP_SIZES = (32, 64, 128, -1)
METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantSettings:
    """What to quantize and how. ``sym`` checkpoints are written as ``gptq`` (v1), asym as ``gptq_v2``.

    ``act_order`` visits columns by descending Hessian diagonal, with static groups so ``g_idx`` stays
    ``i // group_size``. ``damp`` is GPTQ's dampening (fraction of the mean Hessian diagonal), raised ×10
    automatically when a Cholesky factorization fails."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    method: str = "gptq"
    damp: float = 0.01
    quantize_vision: bool = False
    quantize_lm_head: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"--group-size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.act_order and self.method == "rtn":
            raise ConfigError("--act-order applies to --method gptq only")
        if not 0 < self.damp <= 1:
            raise ConfigError(f"damp must lie in (0, 1], got {self.damp}")

    @property
    def checkpoint_format(self) -> str:
        return "gptq" if self.sym else "gptq_v2"

    def as_dict(self) -> dict:
        return {**asdict(self), "checkpoint_format": self.checkpoint_format}


def quantization_config(s: QuantSettings, block_name: str, modules: list[list[str]], meta: dict) -> dict:
    """``config.json["quantization_config"]``, mirrored as ``quantize_config.json``: the union of the keys
    AutoGPTQ, GPTQModel (old and new names), optimum, transformers and vLLM read (§1.6).

    ``block_name`` is the checkpoint prefix of the decoder layers (e.g. ``"model.layers"``); ``modules``
    the quantized linears of one layer, relative to it, grouped by shared input."""
    return {
        "quant_method": "gptq", "method": "gptq",
        "bits": s.bits, "group_size": s.group_size, "desc_act": s.act_order, "static_groups": s.act_order,
        "sym": s.sym, "lm_head": s.quantize_lm_head, "true_sequential": False,
        "damp_percent": s.damp,
        "checkpoint_format": s.checkpoint_format, "format": s.checkpoint_format, "pack_dtype": "int32",
        "block_name_to_quantize": block_name, "modules_in_block_to_quantize": modules,
        "meta": {"quantizer": [f"edgelmm:{__version__}"], "algorithm": s.method,
                 "quantized_vision": s.quantize_vision, **meta},
    }
