"""TinyGPT-V's part configs and spec, torch-free (the ONNX backend reads them from an export's config): EVA
ViT-g (``EvaConfig``), BLIP-2's Q-Former (``QFormerConfig``), the image side up to the language model
(``VisualConfig``) and what EdgeLMM needs to run the model (``TinyGPTVSpec``, the counterpart of ``ModelSpec``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgelmm.config import TextConfig
from edgelmm.errors import ConfigError
from edgelmm.processing.image import ImageSpec

TINYGPTV_FAMILY = "tinygpt-v"


def is_description(path: Path) -> bool:
    """Whether ``path`` is a model description file (a ``.json`` naming released pieces: TinyGPT-V)."""
    return path.suffix == ".json" and path.is_file()


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
class VisualConfig:
    """The image side up to the language model. ``proj_dim`` is ``llama_proj``'s output (4096 upstream)."""

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


@dataclass(slots=True)
class TinyGPTVSpec:
    """What EdgeLMM needs to run TinyGPT-V (the counterpart of ``ModelSpec``): part configs, preprocessing,
    template; the image is spliced at LLaVA's sentinel positions (no image token id)."""

    text: TextConfig
    vision: VisualConfig
    image: ImageSpec
    context_length: int = 2048
    family: str = TINYGPTV_FAMILY
    template: str = "tinygpt-v"
    image_token_id: int | None = None
