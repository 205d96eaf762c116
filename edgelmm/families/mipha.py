"""Mipha (``mipha_phi`` / ``mipha_gemma``; docs/model-formats.md §4)."""
from __future__ import annotations

from pathlib import Path

from edgelmm.config import TextConfig, VisionConfig
from edgelmm.families.common import (
    TEMPLATE_BY_ARCH,
    check_connector,
    image_spec,
    mlp2x_rules,
    section,
    vision_arch,
    vision_rules,
)
from edgelmm.spec import ModelSpec


def parse_mipha(cfg: dict, folder: Path) -> ModelSpec:
    """Mipha (``mipha_phi`` / ``mipha_gemma``): flat LLM config, nested vision_config {vision_tower,
    mm_projector}; fine-tuned SigLIP from the checkpoint, all 729 tokens, pad-to-square."""
    arch = "gemma" if cfg["model_type"] == "mipha_gemma" else "phi"
    nested = section(cfg, "vision_config")
    vcfg, proj = section(nested, "vision_tower"), section(nested, "mm_projector")
    varch = vision_arch(vcfg.get("model_type"), vcfg.get("vision_model_name_or_path", ""))
    check_connector(proj.get("mm_projector_type", "mlp2x_gelu"))
    drop = varch == "clip" and vcfg.get("mm_vision_select_feature", "patch") == "patch"
    vision = VisionConfig.from_hf(vcfg, varch, vcfg.get("mm_vision_select_layer", -2), drop)
    return ModelSpec(
        family="mipha", text=TextConfig.from_hf(cfg, arch), vision=vision, projector_act="gelu",
        image=image_spec(varch, vision.image_size, cfg.get("image_aspect_ratio", "pad") == "pad", folder),
        template=TEMPLATE_BY_ARCH[arch], image_token_id=None,
        context_length=cfg.get("tokenizer_model_max_length", 2048),
        key_rules=(*vision_rules("model.vision_tower.vision_model."), *mlp2x_rules("model.mm_projector."),
                   ("model.", "text."), ("lm_head.", "text.lm_head.")))
