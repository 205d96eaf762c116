"""TinyLLaVA Factory (``model_type: tinyllava``; docs/model-formats.md §1)."""
from __future__ import annotations

from pathlib import Path

from edgelmm.config import TextConfig, VisionConfig
from edgelmm.families.common import (
    TEMPLATE_BY_ARCH,
    check_connector,
    image_spec,
    mlp2x_rules,
    section,
    text_arch,
    vision_arch,
    vision_rules,
)
from edgelmm.spec import ModelSpec


def parse_factory(cfg: dict, folder: Path) -> ModelSpec:
    """TinyLLaVA Factory (``model_type: tinyllava``): nested text/vision configs; drops token 0 even for SigLIP."""
    text_cfg = section(cfg, "text_config")
    arch = text_arch(text_cfg.get("model_type"), cfg.get("llm_model_name_or_path", ""))
    vcfg = section(cfg, "vision_config")
    varch = vision_arch(vcfg.get("model_type"), cfg.get("vision_model_name_or_path", ""))
    check_connector(cfg.get("connector_type", "mlp2x_gelu"))
    strategy = cfg.get("vision_feature_select_strategy", "patch")
    vision = VisionConfig.from_hf(vcfg, varch, cfg.get("vision_feature_layer", -2), strategy == "patch")
    pad = cfg.get("image_aspect_ratio", "square") == "pad"
    return ModelSpec(
        family="tinyllava", text=TextConfig.from_hf(text_cfg, arch), vision=vision, projector_act="gelu",
        image=image_spec(varch, vision.image_size, pad, folder), template=TEMPLATE_BY_ARCH[arch],
        image_token_id=None, context_length=cfg.get("tokenizer_model_max_length", 2048),
        key_rules=(*vision_rules("vision_tower._vision_tower.vision_model."), *mlp2x_rules("connector._connector."),
                   ("language_model.model.", "text."), ("language_model.lm_head.", "text.lm_head.")))
