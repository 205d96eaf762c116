"""The vision-language model: vision tower → projector → image features spliced into the token embeddings
→ decoder."""
from __future__ import annotations

import torch
from torch import nn

from edgelmm.errors import ConfigError
from edgelmm.spec import IMAGE_PLACEHOLDER, ModelSpec
from edgelmm.models.projector import Projector
from edgelmm.models.text import TextModel
from edgelmm.models.vision import VisionTower


class VLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.vision = VisionTower(spec.vision)
        self.projector = Projector(spec.vision.hidden_size, spec.text.hidden_size, spec.projector_act)
        self.text = TextModel(spec.text)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] → image features [B, num_image_tokens, D_text]."""
        return self.projector(self.vision(pixels))

    def splice(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Embed ids [1, T] and overwrite the image positions (``IMAGE_PLACEHOLDER`` or the model's image
        token id) with features [1, N, D] in order; returns embeds [1, T, D]."""
        is_image = ids == IMAGE_PLACEHOLDER
        if self.spec.image_token_id is not None:
            is_image |= ids == self.spec.image_token_id
        embeds = self.text.embed(ids.masked_fill(is_image, 0))  # (1, T, D)
        n = int(is_image.sum())
        if n != features.shape[0] * features.shape[1]:
            raise ConfigError(f"the prompt has {n} image positions but the image gives {features.shape[1]} tokens")
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
