"""HF ``LlavaForConditionalGeneration`` checkpoints (llava-gemma-2b, tiny-llava-v1-hf; docs/model-formats.md §2)."""
from __future__ import annotations

from pathlib import Path

from edgelmm.config import TextConfig, VisionConfig
from edgelmm.families.common import image_spec, section, text_arch, vision_arch, vision_rules
from edgelmm.spec import ModelSpec


def parse_llava_hf(cfg: dict, folder: Path, new_layout: bool) -> ModelSpec:
    """HF ``LlavaForConditionalGeneration`` (llava-gemma-2b, tiny-llava-v1-hf), old or new key layout."""
    text_cfg, vcfg = section(cfg, "text_config"), section(cfg, "vision_config")
    arch = text_arch(text_cfg.get("model_type"))
    varch = vision_arch(vcfg.get("model_type"))
    drop = cfg.get("vision_feature_select_strategy", "default") == "default"
    vision = VisionConfig.from_hf(vcfg, varch, cfg.get("vision_feature_layer", -2), drop)
    image_token = cfg.get("image_token_index", cfg.get("image_token_id"))
    if new_layout:
        rules = (*vision_rules("model.vision_tower.vision_model."),
                 ("model.multi_modal_projector.", "projector."), ("model.language_model.", "text."),
                 ("lm_head.", "text.lm_head."))
    else:
        rules = (*vision_rules("vision_tower.vision_model."), ("multi_modal_projector.", "projector."),
                 ("language_model.model.", "text."), ("language_model.lm_head.", "text.lm_head."))
    return ModelSpec(
        family="llava-hf", text=TextConfig.from_hf(text_cfg, arch), vision=vision,
        projector_act=cfg.get("projector_hidden_act", "gelu"),
        image=image_spec(varch, vision.image_size, False, folder),
        template="gemma_chat" if arch == "gemma" else "llava_hf", image_token_id=image_token,
        context_length=text_cfg.get("max_position_embeddings", 2048), key_rules=rules)
