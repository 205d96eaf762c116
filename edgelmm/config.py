"""Configuration dataclasses, one per model part, each parsed once from the checkpoint's config: the decoder
(``TextConfig``), a SigLIP/CLIP vision tower (``VisionConfig``), and TinyGPT-V's image side (``EvaQFormerConfig``:
an ``EvaConfig`` ViT and a ``QFormerConfig`` Q-Former). Torch-free: the ONNX backend reads them from an export."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from edgelmm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class DecoderStyle:
    """How a decoder family arranges the same parts (its HF module names included)."""

    parallel_block: bool  # attention and MLP read the same normed input (Phi), else one after the other
    gated_mlp: bool  # gate/up/down (SwiGLU, GeGLU), else fc1/fc2
    norm: str  # "layer" (LayerNorm with bias), "rms" or "gemma_rms" (RMSNorm scaled by 1 + w)
    out_proj: str  # the attention output linear's name
    final_norm: str  # the final norm's name
    scale_embeddings: bool  # token embeddings times sqrt(hidden_size) (Gemma)


_PHI = DecoderStyle(True, False, "layer", "dense", "final_layernorm", False)
_LLAMA = DecoderStyle(False, True, "rms", "o_proj", "norm", False)
DECODER_STYLES = {"phi": _PHI, "llama": _LLAMA, "qwen2": _LLAMA,
                  "gemma": DecoderStyle(False, True, "gemma_rms", "o_proj", "norm", True)}
TEXT_ARCHS = tuple(DECODER_STYLES)
VISION_ARCHS = ("siglip", "clip")


def _require(cfg: dict, *keys: str):
    """Return the first of ``keys`` present in ``cfg``; raise ConfigError naming them otherwise."""
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    raise ConfigError(f"config is missing {' / '.join(keys)}; is this an unmodified checkpoint folder?")


def _count(cfg: dict, *keys: str) -> int:
    """The first of ``keys`` present in ``cfg``, which must be a positive integer (ConfigError naming it)."""
    value = _require(cfg, *keys)
    if not _is_size(value, 1):
        raise ConfigError(f"config {keys[0]} is {value!r}, not a positive integer; the config is damaged")
    return value


def _is_size(value, low: int) -> bool:
    """Whether ``value`` is an int (not a bool) in ``[low, 2^31)``: no model part is larger."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**31


def _positive(name: str, value) -> float:
    """``value`` as a float; ConfigError naming ``name`` unless it is a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config {name} is {value!r}, not a finite positive number; the config is damaged")
    return float(value)


def check_fields(config, may_be_zero: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first int field of the dataclass ``config`` that is not a positive int below 2^31
    (non-negative for the fields in ``may_be_zero``), or float field that is not a finite positive number:
    every size, count, eps and theta of a model part."""
    for f in fields(config):
        value = getattr(config, f.name)
        if f.type == "int" and not _is_size(value, 0 if f.name in may_be_zero else 1):
            raise ConfigError(f"{type(config).__name__}.{f.name} is {value!r}, not a positive integer; "
                              "the config is damaged")
        if f.type == "float":
            _positive(f"{type(config).__name__}.{f.name}", value)


@dataclass(slots=True)
class TextConfig:
    """Decoder-only language model hyperparameters (Phi, Llama/TinyLlama, Gemma, Qwen2)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    lm_head_bias: bool
    qkv_bias: bool
    out_bias: bool
    qk_layernorm: bool = False  # per-head LayerNorm on q and k before rotary (Phi option; TinyGPT-V)
    post_attention_rmsnorm: bool = False  # TinyGPT-V: RMSNorm on the attention output (parallel block)

    @property
    def style(self) -> DecoderStyle:
        return DECODER_STYLES[self.arch]

    def __post_init__(self):
        if self.arch not in TEXT_ARCHS:
            raise ConfigError(f"unsupported language model architecture {self.arch!r}; edgelmm runs {TEXT_ARCHS}")
        check_fields(self, may_be_zero=("rotary_dim",))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of kv heads {self.num_kv_heads}")
        if not isinstance(self.hidden_act, str):
            raise ConfigError(f"config hidden_act is {self.hidden_act!r}, not an activation name")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ConfigError(f"rotary dim {self.rotary_dim} must be even and at most head_dim {self.head_dim}")

    @classmethod
    def from_hf(cls, cfg: dict, arch: str) -> TextConfig:
        """Parse an HF text config (PhiConfig/LlamaConfig/GemmaConfig/Qwen2Config fields)."""
        hidden = _count(cfg, "hidden_size")
        heads = _count(cfg, "num_attention_heads")
        if "head_dim" in cfg and cfg["head_dim"] is not None:
            head_dim = _count(cfg, "head_dim")
        elif hidden % heads:
            raise ConfigError(f"config hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                              "the config is damaged")
        else:
            head_dim = hidden // heads
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config rope_scaling is {rope!r}, not an object; the config is damaged")
        partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if _positive("partial_rotary_factor", partial) > 1:
            raise ConfigError(f"config partial_rotary_factor is {partial!r}, more than 1; the config is damaged")
        theta = _positive("rope_theta", cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        if arch == "phi":
            act, eps = cfg.get("hidden_act", "gelu_new"), cfg.get("layer_norm_eps", 1e-5)
            eps = _positive("layer_norm_eps", eps)
        else:
            act, eps = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"), cfg.get("rms_norm_eps", 1e-6)
            eps = _positive("rms_norm_eps", eps)
        if arch == "gemma" and act == "gelu":  # the released Gemma configs say "gelu" but mean tanh-GELU
            act = "gelu_pytorch_tanh"
        return cls(
            arch=arch,
            vocab_size=_count(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_count(cfg, "intermediate_size"),
            num_layers=_count(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_count(cfg, "num_key_value_heads") if cfg.get("num_key_value_heads") else heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            rope_theta=theta,
            norm_eps=eps,
            hidden_act=act,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma")),
            lm_head_bias=arch == "phi",
            qkv_bias=arch in ("phi", "qwen2") or bool(cfg.get("attention_bias", False)),
            out_bias=arch == "phi" or bool(cfg.get("attention_bias", False)),
        )


@dataclass(slots=True)
class VisionConfig:
    """ViT vision tower hyperparameters. Only ``num_layers`` encoder layers are built: the ones that feed
    the selected feature layer, so the unused tail (and the pooling head) is never loaded."""

    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    norm_eps: float
    hidden_act: str
    drop_first_token: bool
    config_layers: int | None = None  # the tower's num_hidden_layers (None: not known, e.g. an older export)

    def __post_init__(self):
        if self.arch not in VISION_ARCHS:
            raise ConfigError(f"unsupported vision tower {self.arch!r}; edgelmm runs {VISION_ARCHS}")
        check_fields(self, may_be_zero=("num_layers",))  # feature layer 0: the embeddings alone
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                              f"{self.num_heads}; the config is damaged")
        if not isinstance(self.hidden_act, str):
            raise ConfigError(f"vision config hidden_act is {self.hidden_act!r}, not an activation name")
        if self.image_size < self.patch_size:
            raise ConfigError(f"image size {self.image_size} is smaller than the patch size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + (self.arch == "clip")

    @property
    def num_image_tokens(self) -> int:
        return self.num_positions - self.drop_first_token

    @classmethod
    def from_hf(cls, cfg: dict, arch: str, feature_layer: int, drop_first_token: bool) -> VisionConfig:
        """Parse an HF SiglipVisionConfig/CLIPVisionConfig dict; ``feature_layer`` indexes HF's
        ``hidden_states`` tuple (embeddings first), so -2 means all layers but the last."""
        total = _count(cfg, "num_hidden_layers")
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
            raise ConfigError(f"config vision feature layer is {feature_layer!r}, not an integer; the config is damaged")
        used = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
        if not 0 <= used <= total:
            raise ConfigError(f"vision feature layer {feature_layer} is outside a {total}-layer tower")
        default_act = "quick_gelu" if arch == "clip" else "gelu_pytorch_tanh"
        return cls(
            arch=arch,
            hidden_size=_count(cfg, "hidden_size"),
            intermediate_size=_count(cfg, "intermediate_size"),
            num_layers=used,
            num_heads=_count(cfg, "num_attention_heads"),
            patch_size=_count(cfg, "patch_size"),
            image_size=_count(cfg, "image_size"),
            norm_eps=_positive("vision layer_norm_eps", cfg.get("layer_norm_eps", 1e-5 if arch == "clip" else 1e-6)),
            hidden_act=cfg.get("hidden_act", default_act),
            drop_first_token=drop_first_token,
            config_layers=total,
        )


@dataclass(slots=True)
class EvaConfig:
    """EVA ViT hyperparameters; the defaults are ViT-g/14 (``create_eva_vit_g``: 39 of EVA-CLIP's 40 blocks)."""

    width: int = 1408
    depth: int = 39
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    mlp_ratio: float = 4.3637  # int(1408 * 4.3637) = 6144
    norm_eps: float = 1e-6

    def __post_init__(self):
        check_fields(self)
        if self.width % self.heads:
            raise ConfigError(f"EVA width {self.width} is not a multiple of its {self.heads} heads")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2 + 1


@dataclass(slots=True)
class QFormerConfig:
    """Q-Former hyperparameters; the defaults are bert-base-uncased with BLIP-2's cross-attention settings."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    num_queries: int = 32

    def __post_init__(self):
        check_fields(self)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"Q-Former hidden size {self.hidden_size} is not a multiple of {self.num_heads} heads")

    @classmethod
    def from_bert(cls, cfg: dict, encoder_width: int, num_queries: int) -> QFormerConfig:
        """Parse a BERT config.json (as ``BertConfig.from_pretrained("bert-base-uncased")`` reads it)."""
        try:
            return cls(hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                       num_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
                       norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), hidden_act=cfg.get("hidden_act", "gelu"),
                       encoder_width=encoder_width, num_queries=num_queries)
        except KeyError as e:
            raise ConfigError(f"the Q-Former's BERT config lacks {e}; pass bert-base-uncased's config.json") from None


@dataclass(slots=True)
class EvaQFormerConfig:
    """TinyGPT-V's image side up to the language model: EVA ViT, Q-Former and ``llama_proj``. ``proj_dim`` is ``llama_proj``'s output (4096 upstream)."""

    eva: EvaConfig
    qformer: QFormerConfig
    proj_dim: int = 4096

    def __post_init__(self):
        if self.qformer.encoder_width != self.eva.width:
            raise ConfigError(f"the Q-Former cross-attends to {self.qformer.encoder_width}-wide features but "
                              f"EVA is {self.eva.width} wide")

    @property
    def num_image_tokens(self) -> int:
        return self.qformer.num_queries
