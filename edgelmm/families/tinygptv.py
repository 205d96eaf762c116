"""TinyGPT-V's family: its description file, part configs and spec (torch-free; docs/model-formats.md §3).

TinyGPT-V ships no config.json: a stage checkpoint holds only the trained tensors, and the rest comes from
three external bases. The description file names them; relative paths are read from the file's folder::

    {
      "format": "tinygpt-v",
      "stage": 3,
      "checkpoint": "TinyGPT-V_for_Stage3.pth",
      "phi2": "phi-2",
      "eva_vit": "eva_vit_g.pth",
      "qformer": "blip2_pretrained_flant5xxl.pth",
      "qformer_config": "bert-base-uncased"
    }

- ``format``: must be ``"tinygpt-v"``.
- ``stage``: 1-4. Stages 1-3 run at 224x224, stage 4 at 448x448.
- ``checkpoint``: ``TinyGPT-V_for_Stage{1..4}.pth`` (its ``model`` dict: llama_proj(2), norm weights, LoRA A/B).
- ``phi2``: the Phi-2 folder in the transformers-4.36 layout (fused ``query_key_value``; a folder saved by
  transformers >= 4.37, with q/k/v apart, works too), with its tokenizer.
- ``eva_vit``: LAVIS ``eva_vit_g.pth``.
- ``qformer``: the BLIP-2 checkpoint with ``Qformer.*``, ``query_tokens`` and ``ln_vision``.
- ``qformer_config``: bert-base-uncased's ``config.json``, or the folder holding it.
- Optional: ``image_size`` (must agree with ``stage``); ``lora_alpha`` (default: the checkpoint's saved
  config, else 16; the rank comes from the LoRA tensors, and ``lora_r``, if given, is checked against it);
  ``vision`` (EVA sizes ``width``/``depth``/``heads``/``patch_size``, default ViT-g/14: 1408/39/16/14);
  ``context_length`` (KV cache length, default 2048).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgelmm.checkpoint.json_file import read_json
from edgelmm.config import EvaConfig, EvaQFormerConfig, TextConfig
from edgelmm.errors import CheckpointError, ConfigError, UnsupportedModelError
from edgelmm.processing.image import CLIP_MEAN, CLIP_STD, ImageSpec
from edgelmm.spec import ModelSpec

TINYGPTV_FAMILY = "tinygpt-v"
MARKER = "tinygpt-v"
PIECES = ("checkpoint", "phi2", "eva_vit", "qformer", "qformer_config")


def is_description(path: Path) -> bool:
    """Whether ``path`` is a model description file (a ``.json`` naming released pieces: TinyGPT-V)."""
    return path.suffix == ".json" and path.is_file()


@dataclass(slots=True)
class Description:
    """A parsed description file: the stage, its input size, and where each released piece is."""

    path: Path
    stage: int
    eva: EvaConfig
    pieces: dict[str, Path]
    lora_alpha: float | None = None
    lora_r: int | None = None
    context_length: int = 2048

    @classmethod
    def read(cls, path: Path) -> Description:
        cfg = read_json(path)
        if not isinstance(cfg, dict) or cfg.get("format") != MARKER:
            raise UnsupportedModelError(f"{path} is not a model description edgelmm knows; a TinyGPT-V description "
                                        f'has "format": "{MARKER}" (see edgelmm/families/tinygptv.py)')
        stage = cfg.get("stage")
        if stage not in (1, 2, 3, 4):
            raise ConfigError(f'{path}: "stage" must be 1, 2, 3 or 4 (the TinyGPT-V_for_StageN.pth you use)')
        size = 448 if stage == 4 else 224
        if cfg.get("image_size", size) != size:
            raise ConfigError(f"{path}: stage {stage} runs at {size}x{size} (stages 1-3: 224, stage 4: 448), "
                              f"not {cfg['image_size']}; fix image_size or stage")
        pieces = {}
        for key in PIECES:
            if not isinstance(cfg.get(key), str):
                raise ConfigError(f'{path} lacks "{key}" (the path of a released TinyGPT-V piece)')
            pieces[key] = (path.parent / Path(cfg[key]).expanduser()).resolve()
        vision = cfg.get("vision", {})
        if not isinstance(vision, dict):
            raise ConfigError(f'{path}: "vision" is {vision!r}, not an object of EVA sizes')
        unknown = set(vision) - {"width", "depth", "heads", "patch_size"}
        if unknown:
            raise ConfigError(f'{path}: unknown "vision" keys {sorted(unknown)}; use width, depth, heads, patch_size')
        alpha, rank = cfg.get("lora_alpha"), cfg.get("lora_r")
        if alpha is not None and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                      and math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f'{path}: "lora_alpha" is {alpha!r}, not a finite positive number')
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise ConfigError(f'{path}: "lora_r" is {rank!r}, not a positive integer')
        return cls(path, stage, EvaConfig(**vision, image_size=size), pieces, alpha, rank,
                   cfg.get("context_length", 2048))


def trained_image_size(checkpoint: dict) -> int | None:
    """The input size a training-runner save was trained at, from its saved config (None if absent)."""
    model = (checkpoint.get("config") or {}).get("model") or {}
    if "image_size" in model:
        return int(model["image_size"])
    return {"minigpt_v2": 448, "minigpt4": 224}.get(model.get("arch"))


def bert_config(path: Path) -> dict:
    """The Q-Former's BERT config.json (``path`` is the file or its folder)."""
    return read_json(path / "config.json" if path.is_dir() else path)


def projection_dim(desc: Description) -> int:
    """``llama_proj``'s output width (4096 upstream), read from the stage checkpoint's tensor shapes."""
    from edgelmm.checkpoint.tinygptv_pieces import read_pth, state_dict  # torch: the checkpoint is a pickle

    tensors = state_dict(read_pth(desc.pieces["checkpoint"], "stage checkpoint"), desc.pieces["checkpoint"],
                         "stage checkpoint")
    weight = next((v for k, v in tensors.items() if k.endswith("llama_proj.weight")), None)
    if weight is None:
        raise CheckpointError(f"{desc.pieces['checkpoint']} has no llama_proj.weight; is it a TinyGPT-V stage "
                              "checkpoint?")
    return weight.shape[0]


def text_config(desc: Description) -> TextConfig:
    """The modified Phi-2's config, from the Phi-2 folder's config.json."""
    folder = desc.pieces["phi2"]
    if not folder.is_dir():
        raise CheckpointError(f"Phi-2 folder {folder} not found; point \"phi2\" at the transformers-4.36 Phi-2 folder")
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") != "phi":
        raise UnsupportedModelError(f"{folder} holds a {cfg.get('model_type')!r} model; TinyGPT-V needs Phi-2")
    text = TextConfig.from_hf(cfg, "phi")
    text.qk_layernorm = text.post_attention_rmsnorm = True  # TinyGPT-V's modeling_phi.py, always on
    return text


def tinygptv_spec(text: TextConfig, vision: EvaQFormerConfig, context_length: int = 2048) -> ModelSpec:
    """TinyGPT-V's spec: CLIP-normalized square images at EVA's input size, the image spliced at LLaVA's
    sentinel positions (no image token id), its own template."""
    image = ImageSpec(vision.eva.image_size, "square", CLIP_MEAN, CLIP_STD)
    return ModelSpec(family=TINYGPTV_FAMILY, text=text, vision=vision, image=image, template="tinygpt-v",
                     context_length=context_length)
