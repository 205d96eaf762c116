"""Memory planner: the bytes each part of a model needs at a given quantization, KV-cache precision and
context, and whether that fits a memory budget. Parameter shapes come from the model built on the meta
device (no memory used), so the plan covers every family the runtime loads."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from edgelmm.config import EvaQFormerConfig
from edgelmm.errors import ConfigError, MemoryBudgetError

BNB_METHODS = ("nf4", "fp4", "int8")  # bitsandbytes' load-time quantizations
BNB_BLOCK, BNB_NESTED_BLOCK = 64, 256  # weights per 4-bit absmax; absmax per fp32 nested absmax

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | float) -> int:
    """'8GB', '7.5 GiB', '512MB' or a byte count → bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read the memory size {text!r}; write e.g. 8GB, 7.5GiB or 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True, slots=True)
class PlanSettings:
    """What the plan assumes: weight bits for the LLM's linears (16 = unquantized), GPTQ group size, KV bits
    (16 or 8, int8 with one fp16 scale per token and head), context length, bytes per unquantized value,
    and which optional parts are quantized too. ``bnb`` (nf4, fp4 or int8) plans bitsandbytes' load-time
    quantization instead of GPTQ's ``bits``."""

    bits: int = 16
    group_size: int = 128
    kv_bits: int = 16
    context: int = 2048
    dtype_bytes: int = 2
    quantize_vision: bool = False
    quantize_lm_head: bool = False
    overhead: int = 0  # runtime context (e.g. the CUDA context), given by the caller
    bnb: str | None = None

    def __post_init__(self):
        if self.bnb is not None and (self.bnb not in BNB_METHODS or self.bits < 16):
            raise ConfigError(f"bitsandbytes quantization must be one of {', '.join(BNB_METHODS)} on unquantized "
                              f"weights (bits 16), got {self.bnb!r} at {self.bits} bits")
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"bits must be 4, 8 or 16, got {self.bits}")
        if self.kv_bits not in (8, 16, 32):
            raise ConfigError(f"KV cache bits must be 8, 16 or 32, got {self.kv_bits}")


@dataclass
class MemoryPlan:
    """Bytes per part; ``fits`` compares the total with ``budget`` (None: no budget)."""

    parts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    budget: int | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def table(self) -> str:
        rows = [f"  {name:<22}{_gb(n):>10}  {self.notes.get(name, '')}" for name, n in self.parts.items()]
        rows.append(f"  {'total':<22}{_gb(self.total):>10}")
        if self.budget is not None:
            verdict = "fits" if self.fits else f"does NOT fit ({_gb(self.total - self.budget)} over)"
            rows.append(f"  {'budget':<22}{_gb(self.budget):>10}  {verdict}")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {"parts": self.parts, "total": self.total, "budget": self.budget, "fits": self.fits}


def require_fit(plan: MemoryPlan, advice: str) -> None:
    """Raise MemoryBudgetError, with the plan's table and ``advice``, when ``plan`` exceeds its budget."""
    if not plan.fits:
        raise MemoryBudgetError(f"this model needs about {plan.total / 1e9:.2f} GB but max_memory is "
                                f"{plan.budget / 1e9:.2f} GB:\n{plan.table()}\n{advice}")


def bnb_linear_bytes(out_features: int, in_features: int, method: str) -> int:
    """bitsandbytes storage of one linear's weight (docs/quant-formats.md §6). nf4 / fp4: two codes per byte, one
    uint8 absmax per block of 64 (double quantization), an fp32 absmax and offset per 256 of those, the 16-entry
    code book and the 256-entry nested one in fp32. int8: one byte per weight and an fp32 scale per row."""
    n = out_features * in_features
    if method == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / BNB_BLOCK)
    return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCK) + 4 + 4 * (16 + 256)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def quantized_linear_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """GPTQ storage of one linear (docs/quant-formats.md §1.1): qweight, qzeros, fp16 scales, int32 g_idx."""
    groups = math.ceil(in_features / (in_features if group_size == -1 else group_size))
    return (in_features * out_features * bits // 8 + groups * out_features * bits // 8
            + groups * out_features * 2 + in_features * 4)


def part_of(name: str) -> str:
    """The plan part a parameter belongs to (also the parts ``quantize=`` quantizes: llm weights, vision tower)."""
    if name.startswith("text.embed_tokens"):
        return "embeddings"
    if name.startswith("text.lm_head"):
        return "lm_head"
    if name.startswith("text."):
        return "llm weights"
    if name.startswith(("projector.", "llama_proj")):
        return "connector"
    return "vision tower"


@dataclass(frozen=True, slots=True)
class VisionSize:
    """The vision encoder's sequence length and widths, for its activation workspace."""

    tokens: int
    hidden: int
    intermediate: int


def plan_memory(model, image_tokens: int, vision: VisionSize, settings: PlanSettings,
                budget: int | None = None) -> MemoryPlan:
    """Plan the memory of ``model`` (a VLM or TinyGPT-V, ideally built on the meta device)."""
    s, text = settings, model.text.cfg
    plan = MemoryPlan(parts=dict.fromkeys(("vision tower", "connector", "llm weights", "embeddings",
                                           "lm_head"), 0), budget=budget)
    low = s.bits < 16 or s.bnb is not None
    quantized = {"llm weights": low, "vision tower": low and s.quantize_vision,
                 "lm_head": s.bits < 16 and s.quantize_lm_head, "connector": False, "embeddings": False}
    for name, p in model.named_parameters():
        part = part_of(name)
        if part == "lm_head" and text.tie_word_embeddings:
            continue  # shares the embedding matrix
        if quantized[part] and p.ndim == 2 and name.endswith("weight") and "embed" not in name:
            plan.parts[part] += (bnb_linear_bytes(p.shape[0], p.shape[1], s.bnb) if s.bnb else
                                 quantized_linear_bytes(p.shape[0], p.shape[1], s.bits, s.group_size))
        else:
            plan.parts[part] += p.numel() * s.dtype_bytes
    kv_values = 2 * text.num_layers * text.num_kv_heads * s.context * text.head_dim
    kv_scales = 2 * text.num_layers * text.num_kv_heads * s.context * 2 if s.kv_bits == 8 else 0
    plan.parts["kv cache"] = kv_values * s.kv_bits // 8 + kv_scales
    plan.parts["rotary tables"] = 2 * text.max_position_embeddings * text.rotary_dim * 4  # fp32 cos and sin
    plan.parts["image features"] = image_tokens * text.hidden_size * s.dtype_bytes
    plan.parts["activations"] = workspace_bytes(text, prompt_tokens(image_tokens, s), vision, s.dtype_bytes)
    if s.overhead:
        plan.parts["runtime overhead"] = s.overhead
    low_note = _BNB_NOTES.get(s.bnb, f"{s.bits}-bit")
    plan.notes.update({
        "llm weights": (low_note if s.bnb else f"{s.bits}-bit g{s.group_size}") if low else f"{8 * s.dtype_bytes}-bit",
        "vision tower": low_note if quantized["vision tower"] else f"{8 * s.dtype_bytes}-bit",
        "lm_head": "tied to embeddings" if text.tie_word_embeddings else "",
        "kv cache": f"{'int8 + fp16 scales' if s.kv_bits == 8 else f'{s.kv_bits}-bit'}, {s.context} tokens",
        "image features": f"{image_tokens} tokens",
        "activations": "peak transient of vision / prefill (flash attention: no T x T scores)"})
    return plan


_BNB_NOTES = {"nf4": "bnb nf4, absmax per 64, double-quantized", "fp4": "bnb fp4, absmax per 64, double-quantized",
              "int8": "bnb int8, a scale per row"}


def prompt_tokens(image_tokens: int, s: PlanSettings) -> int:
    """The prompt the plan assumes: an image plus a typical question (128 tokens)."""
    return min(s.context, image_tokens + 128)


def workspace_bytes(text, tokens: int, vision: VisionSize, dtype_bytes: int) -> int:
    """Peak transient bytes: the larger of the vision encoder's and a ``tokens``-long prefill's live activations
    (residual stream, normed input and block output, plus the widest intermediate)."""
    gated = 2 if text.style.gated_mlp else 1
    qkv = (text.num_heads + 2 * text.num_kv_heads) * text.head_dim
    prefill = tokens * (3 * text.hidden_size + max(gated * text.intermediate_size, qkv + text.hidden_size))
    encoder = vision.tokens * (3 * vision.hidden + max(vision.intermediate, 4 * vision.hidden))
    return max(prefill, encoder) * dtype_bytes + text.vocab_size * 4  # + fp32 logits of the last position


def vision_size(vision) -> VisionSize:
    """The vision encoder's token count and widths from a spec's ``vision`` config (TinyGPT-V: its EVA's)."""
    if isinstance(vision, EvaQFormerConfig):
        return VisionSize(vision.eva.num_tokens, vision.eva.width, vision.eva.mlp_dim)
    return VisionSize(vision.num_positions, vision.hidden_size, vision.intermediate_size)
