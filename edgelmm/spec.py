"""ModelSpec: everything the runtime needs to know about one checkpoint, resolved once at load time."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgelmm.config import TextConfig, VisionConfig
from edgelmm.processing.image import ImageSpec

IMAGE_PLACEHOLDER = -200  # marks image positions in prompt ids (LLaVA's sentinel, expanded N times)

# (checkpoint key prefix, edgelmm key prefix) pairs; the longest matching prefix wins.
KeyRules = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class ModelSpec:
    """A checkpoint's family, part configs, preprocessing, prompt template and key layout."""

    family: str
    text: TextConfig
    vision: VisionConfig
    projector_act: str
    image: ImageSpec
    template: str
    image_token_id: int | None  # None: LLaVA sentinel splicing; else HF Llava's expanded image token
    key_rules: KeyRules
    vision_dir: Path | None = None  # a separate vision tower folder (legacy TinyLLaVA)
    vision_key_rules: KeyRules = field(default_factory=tuple)
    context_length: int = 2048
