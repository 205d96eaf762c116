"""Legacy TinyLLaVA (TinyLLaVABench: ``tiny_llava_phi`` / ``tiny_llava``; docs/model-formats.md §1), whose
vision tower is a separate checkpoint."""
from __future__ import annotations

from pathlib import Path

from edgelmm.checkpoint.json_file import read_json
from edgelmm.config import TextConfig, VisionConfig
from edgelmm.errors import CheckpointError
from edgelmm.families.common import check_connector, image_spec, mlp2x_rules, section, vision_arch, vision_rules
from edgelmm.spec import ModelSpec


def find_vision_tower(name: str, folder: Path) -> Path | None:
    """Locate legacy TinyLLaVA's separate vision tower offline: ``name`` as a path (absolute or relative
    to the checkpoint), a sibling folder with the repo's basename, the old in-repo ``siglip_vision_tower/``,
    or the Hugging Face cache."""
    base = name.rstrip("/").split("/")[-1]
    candidates = [Path(name), folder / name, folder.parent / base, folder / "siglip_vision_tower"]
    hub = Path.home() / ".cache" / "huggingface" / "hub" / f"models--{name.replace('/', '--')}" / "snapshots"
    if hub.is_dir():
        candidates += sorted(hub.iterdir())
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def parse_legacy(cfg: dict, folder: Path, vision_tower: str | Path | None) -> ModelSpec:
    """Legacy TinyLLaVABench (``tiny_llava_phi`` / ``tiny_llava``): flat config, vision tower reloaded from
    its own folder (26 of 27 SigLIP layers), bias-free lm_head, pad-to-square."""
    arch = "llama" if cfg["model_type"] == "tiny_llava" else "phi"
    name = str(vision_tower or cfg.get("mm_vision_tower", ""))
    tower = find_vision_tower(name, folder)
    if tower is None:
        raise CheckpointError(
            f"legacy TinyLLaVA loads its vision tower from {name!r}, which is not on this machine. Put that "
            f"checkpoint in a folder next to {folder} (named {name.split('/')[-1]!r}) or pass vision_tower=PATH.")
    vcfg = read_json(tower / "config.json")
    vcfg = section(vcfg, "vision_config", str(tower / "config.json")) or vcfg
    varch = vision_arch(vcfg.get("model_type"), name)
    check_connector(cfg.get("mm_projector_type", "linear"))
    vision = VisionConfig.from_hf(vcfg, varch, cfg.get("mm_vision_select_layer", -2), varch == "clip")
    text = TextConfig.from_hf(cfg, arch)
    text.lm_head_bias = False
    return ModelSpec(
        family="tinyllava-legacy", text=text, vision=vision, projector_act="gelu",
        image=image_spec(varch, vision.image_size, cfg.get("image_aspect_ratio") == "pad", tower),
        template="phi" if arch == "phi" else "vicuna_v1", image_token_id=None,
        context_length=cfg.get("tokenizer_model_max_length", cfg.get("max_position_embeddings", 2048)),
        key_rules=(*mlp2x_rules("model.mm_projector."), ("model.vision_tower.", "unused.vision_copy."),
                   ("model.", "text."), ("lm_head.", "text.lm_head.")),
        vision_dir=tower, vision_key_rules=vision_rules("vision_model."))
