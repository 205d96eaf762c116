"""The checkpoint families edgelmm loads, one module each: how its config.json becomes a ModelSpec (part
configs, feature-layer and token-drop rules, image preprocessing, prompt template, splicing style, key
layout). TinyGPT-V, which ships no config.json, is read from a description file (``families.tinygptv``)."""
from __future__ import annotations

from pathlib import Path

from edgelmm.errors import ConfigError, EdgeLMMError, UnsupportedModelError
from edgelmm.families.factory import parse_factory
from edgelmm.families.legacy import parse_legacy
from edgelmm.families.llava_hf import parse_llava_hf
from edgelmm.families.mipha import parse_mipha
from edgelmm.spec import ModelSpec


def detect(cfg: dict, folder: Path, weight_keys, vision_tower: str | Path | None = None) -> ModelSpec:
    """Build the ModelSpec for a checkpoint folder from its config.json (docs/model-formats.md §7.1).
    A value of the wrong JSON type that no specific check names is a ConfigError naming the file."""
    try:
        return _detect(cfg, folder, weight_keys, vision_tower)
    except EdgeLMMError:
        raise
    except (TypeError, AttributeError, ValueError, KeyError) as e:
        raise ConfigError(f"{folder / 'config.json'} has a value of the wrong type ({type(e).__name__}: {e}); "
                          "the config is damaged, download it again") from None


def _detect(cfg: dict, folder: Path, weight_keys, vision_tower: str | Path | None) -> ModelSpec:
    kind = cfg.get("model_type")
    if kind == "tinyllava":
        return parse_factory(cfg, folder)
    if kind in ("tiny_llava_phi", "tiny_llava", "llava_phi"):
        return parse_legacy(cfg, folder, vision_tower)
    if kind in ("mipha_phi", "mipha_gemma"):
        return parse_mipha(cfg, folder)
    if kind == "llava":
        return parse_llava_hf(cfg, folder, any(k.startswith("model.language_model.") for k in weight_keys))
    raise UnsupportedModelError(
        f"model_type {kind!r} in {folder / 'config.json'} is not supported. edgelmm loads TinyLLaVA "
        "(tinyllava, tiny_llava_phi, tiny_llava), HF Llava (llava) and Mipha (mipha_phi, mipha_gemma) checkpoints.")
