"""Family detection from config.json and the per-family quirks (model-formats.md §0-§4, §7).

Each parser turns an unmodified checkpoint's config into a ModelSpec: part configs, feature-layer and
token-drop rules, image preprocessing, prompt template, splicing style and checkpoint key layout."""
from __future__ import annotations

import json
from pathlib import Path

from edgelmm.config import TextConfig, VisionConfig
from edgelmm.errors import CheckpointError, UnsupportedModelError
from edgelmm.processing.image import ImageSpec
from edgelmm.spec import KeyRules, ModelSpec

TEMPLATE_BY_ARCH = {"phi": "phi", "llama": "llama", "gemma": "gemma_factory", "qwen2": "qwen2"}


def vision_rules(ckpt_prefix: str) -> KeyRules:
    """Rules mapping an HF ``...vision_model.`` subtree at ``ckpt_prefix`` onto edgelmm's ``vision.``."""
    return ((ckpt_prefix + "embeddings.", "vision.embeddings."),
            (ckpt_prefix + "pre_layrnorm.", "vision.pre_layrnorm."),
            (ckpt_prefix + "encoder.layers.", "vision.layers."))


def mlp2x_rules(ckpt_prefix: str) -> KeyRules:
    return ((ckpt_prefix + "0.", "projector.linear_1."), (ckpt_prefix + "2.", "projector.linear_2."))


def _text_arch(model_type: str | None, name_hint: str = "") -> str:
    """LLM architecture from a text config's model_type, else (like the Factory) from the model name."""
    if model_type in ("phi", "llama", "gemma", "qwen2"):
        return model_type
    hint = name_hint.lower()
    for needle, arch in (("phi", "phi"), ("gemma", "gemma"), ("qwen2", "qwen2"), ("llama", "llama")):
        if needle in hint:
            return arch
    raise UnsupportedModelError(f"cannot tell the language model from model_type={model_type!r} / {name_hint!r}; "
                                "edgelmm runs Phi, Llama/TinyLlama, Gemma and Qwen2 decoders")


def _vision_arch(model_type: str | None, name_hint: str = "") -> str:
    for needle, arch in (("siglip", "siglip"), ("clip", "clip")):
        if needle in (model_type or "") or needle in name_hint.lower():
            return arch
    raise UnsupportedModelError(f"unsupported vision tower (model_type={model_type!r}, name={name_hint!r}); "
                                "edgelmm runs SigLIP and CLIP towers")


def _image_spec(arch: str, size: int, pad: bool, folder: Path) -> ImageSpec:
    """The checkpoint's preprocessor_config.json when it ships one, else the tower's stock processor."""
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        return ImageSpec.from_preprocessor_config(json.loads(pre.read_text()), pad=pad)
    return ImageSpec.siglip(size=size, pad=pad) if arch == "siglip" else ImageSpec.clip(size=size, pad=pad)


def _check_connector(kind: str):
    if kind != "mlp2x_gelu":
        raise UnsupportedModelError(f"connector {kind!r} is not supported; edgelmm runs mlp2x_gelu connectors")


def parse_factory(cfg: dict, folder: Path) -> ModelSpec:
    """TinyLLaVA Factory (``model_type: tinyllava``): nested text/vision configs; drops token 0 even for SigLIP."""
    text_cfg = cfg.get("text_config") or {}
    arch = _text_arch(text_cfg.get("model_type"), cfg.get("llm_model_name_or_path", ""))
    vcfg = cfg.get("vision_config") or {}
    varch = _vision_arch(vcfg.get("model_type"), cfg.get("vision_model_name_or_path", ""))
    _check_connector(cfg.get("connector_type", "mlp2x_gelu"))
    strategy = cfg.get("vision_feature_select_strategy", "patch")
    vision = VisionConfig.from_hf(vcfg, varch, cfg.get("vision_feature_layer", -2), strategy == "patch")
    pad = cfg.get("image_aspect_ratio", "square") == "pad"
    return ModelSpec(
        family="tinyllava", text=TextConfig.from_hf(text_cfg, arch), vision=vision, projector_act="gelu",
        image=_image_spec(varch, vision.image_size, pad, folder), template=TEMPLATE_BY_ARCH[arch],
        image_token_id=None, context_length=cfg.get("tokenizer_model_max_length", 2048),
        key_rules=(*vision_rules("vision_tower._vision_tower.vision_model."), *mlp2x_rules("connector._connector."),
                   ("language_model.model.", "text."), ("language_model.lm_head.", "text.lm_head.")))


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
    vcfg = json.loads((tower / "config.json").read_text())
    vcfg = vcfg.get("vision_config", vcfg)
    varch = _vision_arch(vcfg.get("model_type"), name)
    _check_connector(cfg.get("mm_projector_type", "linear"))
    vision = VisionConfig.from_hf(vcfg, varch, cfg.get("mm_vision_select_layer", -2), varch == "clip")
    text = TextConfig.from_hf(cfg, arch)
    text.lm_head_bias = False
    return ModelSpec(
        family="tinyllava-legacy", text=text, vision=vision, projector_act="gelu",
        image=_image_spec(varch, vision.image_size, cfg.get("image_aspect_ratio") == "pad", tower),
        template="phi" if arch == "phi" else "vicuna_v1", image_token_id=None,
        context_length=cfg.get("tokenizer_model_max_length", cfg.get("max_position_embeddings", 2048)),
        key_rules=(*mlp2x_rules("model.mm_projector."), ("model.vision_tower.", "unused.vision_copy."),
                   ("model.", "text."), ("lm_head.", "text.lm_head.")),
        vision_dir=tower, vision_key_rules=vision_rules("vision_model."))


def parse_mipha(cfg: dict, folder: Path) -> ModelSpec:
    """Mipha (``mipha_phi`` / ``mipha_gemma``): flat LLM config, nested vision_config {vision_tower,
    mm_projector}; fine-tuned SigLIP from the checkpoint, all 729 tokens, pad-to-square."""
    arch = "gemma" if cfg["model_type"] == "mipha_gemma" else "phi"
    nested = cfg.get("vision_config") or {}
    vcfg, proj = nested.get("vision_tower") or {}, nested.get("mm_projector") or {}
    varch = _vision_arch(vcfg.get("model_type"), vcfg.get("vision_model_name_or_path", ""))
    _check_connector(proj.get("mm_projector_type", "mlp2x_gelu"))
    drop = varch == "clip" and vcfg.get("mm_vision_select_feature", "patch") == "patch"
    vision = VisionConfig.from_hf(vcfg, varch, vcfg.get("mm_vision_select_layer", -2), drop)
    return ModelSpec(
        family="mipha", text=TextConfig.from_hf(cfg, arch), vision=vision, projector_act="gelu",
        image=_image_spec(varch, vision.image_size, cfg.get("image_aspect_ratio", "pad") == "pad", folder),
        template=TEMPLATE_BY_ARCH[arch], image_token_id=None,
        context_length=cfg.get("tokenizer_model_max_length", 2048),
        key_rules=(*vision_rules("model.vision_tower.vision_model."), *mlp2x_rules("model.mm_projector."),
                   ("model.", "text."), ("lm_head.", "text.lm_head.")))


def parse_llava_hf(cfg: dict, folder: Path, new_layout: bool) -> ModelSpec:
    """HF ``LlavaForConditionalGeneration`` (llava-gemma-2b, tiny-llava-v1-hf), old or new key layout."""
    text_cfg, vcfg = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    arch = _text_arch(text_cfg.get("model_type"))
    varch = _vision_arch(vcfg.get("model_type"))
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
        image=_image_spec(varch, vision.image_size, False, folder),
        template="gemma_chat" if arch == "gemma" else "llava_hf", image_token_id=image_token,
        context_length=text_cfg.get("max_position_embeddings", 2048), key_rules=rules)


def detect(cfg: dict, folder: Path, weight_keys, vision_tower: str | Path | None = None) -> ModelSpec:
    """Build the ModelSpec for a checkpoint folder from its config.json (model-formats.md §7.1)."""
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
