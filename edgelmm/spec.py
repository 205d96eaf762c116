"""ModelSpec: everything the runtime needs to know about one checkpoint, resolved once at load time."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgelmm.config import EvaQFormerConfig, TextConfig, VisionConfig
from edgelmm.errors import ConfigError
from edgelmm.processing.image import ImageSpec

IMAGE_PLACEHOLDER = -200  # marks image positions in prompt ids (LLaVA's sentinel, expanded N times)

# (checkpoint key prefix, edgelmm key prefix) pairs; the longest matching prefix wins.
KeyRules = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class ModelSpec:
    """A checkpoint's family, part configs, preprocessing, prompt template and key layout. ``vision`` is a
    SigLIP/CLIP tower with a two-layer projector (LLaVA-style families) or TinyGPT-V's EVA + Q-Former."""

    family: str
    text: TextConfig
    vision: VisionConfig | EvaQFormerConfig
    image: ImageSpec
    template: str
    image_token_id: int | None = None  # None: LLaVA sentinel splicing; else HF Llava's expanded image token
    projector_act: str = "gelu"  # the LLaVA-style projector's activation
    key_rules: KeyRules = ()
    vision_dir: Path | None = None  # a separate vision tower folder (legacy TinyLLaVA)
    vision_key_rules: KeyRules = field(default_factory=tuple)
    context_length: int = 2048

    def __post_init__(self):
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int) or self.context_length < 1:
            raise ConfigError(f"the context length {self.context_length!r} (tokenizer_model_max_length / "
                              "max_position_embeddings) is not a positive integer; the config is damaged")
        if self.image_token_id is not None and (isinstance(self.image_token_id, bool)
                                                or not isinstance(self.image_token_id, int)):
            raise ConfigError(f"image_token_index {self.image_token_id!r} is not an integer; the config is damaged")

    @property
    def image_ids(self) -> tuple[int, ...]:
        """The ids marking image positions in prompt ids: LLaVA's placeholder, plus HF Llava's image token."""
        return (IMAGE_PLACEHOLDER,) + ((self.image_token_id,) if self.image_token_id is not None else ())


def check_image_positions(positions: int, images: int, tokens_per_image: int) -> None:
    """Raise ConfigError unless a prompt's ``positions`` image slots take exactly ``images`` x
    ``tokens_per_image`` feature rows."""
    if positions != images * tokens_per_image:
        raise ConfigError(f"the prompt has {positions} image positions but the image gives {tokens_per_image} tokens")
