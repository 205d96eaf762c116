"""The vision-language model: vision tower → projector → image features spliced into the token embeddings
→ decoder."""
from __future__ import annotations

import torch
from torch import nn

from edgelmm.models.projector import Projector
from edgelmm.models.splice import splice_image
from edgelmm.models.text import TextModel
from edgelmm.models.vision import VisionTower
from edgelmm.spec import ModelSpec


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
        """Embed ids [1, T] with the image features [1, N, D] at the image positions; returns embeds [1, T, D]."""
        return splice_image(self.text, ids, features, self.spec.image_ids)
