"""What the LLaVA-style families share: key-rule builders, architecture names from configs, the image
preprocessing a checkpoint ships, and the connector check."""
from __future__ import annotations

from pathlib import Path

from edgelmm.checkpoint.json_file import read_json
from edgelmm.errors import ConfigError, UnsupportedModelError
from edgelmm.processing.image import ImageSpec
from edgelmm.spec import KeyRules

TEMPLATE_BY_ARCH = {"phi": "phi", "llama": "llama", "gemma": "gemma_factory", "qwen2": "qwen2"}


def vision_rules(ckpt_prefix: str) -> KeyRules:
    """Rules mapping an HF ``...vision_model.`` subtree at ``ckpt_prefix`` onto edgelmm's ``vision.``."""
    return ((ckpt_prefix + "embeddings.", "vision.embeddings."),
            (ckpt_prefix + "pre_layrnorm.", "vision.pre_layrnorm."),
            (ckpt_prefix + "encoder.layers.", "vision.layers."))


def mlp2x_rules(ckpt_prefix: str) -> KeyRules:
    return ((ckpt_prefix + "0.", "projector.linear_1."), (ckpt_prefix + "2.", "projector.linear_2."))


def section(cfg: dict, key: str, where: str = "config.json") -> dict:
    """``cfg[key]`` (a nested config object; ``{}`` when absent); ConfigError when it is not an object."""
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} in {where} is {value!r}, not an object; the config is damaged")
    return value


def text_arch(model_type: str | None, name_hint: str = "") -> str:
    """LLM architecture from a text config's model_type, else (like the Factory) from the model name."""
    if model_type in ("phi", "llama", "gemma", "qwen2"):
        return model_type
    hint = name_hint.lower()
    for needle, arch in (("phi", "phi"), ("gemma", "gemma"), ("qwen2", "qwen2"), ("llama", "llama")):
        if needle in hint:
            return arch
    raise UnsupportedModelError(f"cannot tell the language model from model_type={model_type!r} / {name_hint!r}; "
                                "edgelmm runs Phi, Llama/TinyLlama, Gemma and Qwen2 decoders")


def vision_arch(model_type: str | None, name_hint: str = "") -> str:
    for needle, arch in (("siglip", "siglip"), ("clip", "clip")):
        if needle in (model_type or "") or needle in name_hint.lower():
            return arch
    raise UnsupportedModelError(f"unsupported vision tower (model_type={model_type!r}, name={name_hint!r}); "
                                "edgelmm runs SigLIP and CLIP towers")


def image_spec(arch: str, size: int, pad: bool, folder: Path) -> ImageSpec:
    """The checkpoint's preprocessor_config.json when it ships one, else the tower's stock processor."""
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        return ImageSpec.from_preprocessor_config(read_json(pre), pad=pad)
    return ImageSpec.siglip(size=size, pad=pad) if arch == "siglip" else ImageSpec.clip(size=size, pad=pad)


def check_connector(kind: str):
    if kind != "mlp2x_gelu":
        raise UnsupportedModelError(f"connector {kind!r} is not supported; edgelmm runs mlp2x_gelu connectors")
