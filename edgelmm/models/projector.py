"""Vision-to-language connectors: LLaVA's ``mlp2x_gelu`` and HF Llava's multi-modal projector (the same
Linear → GELU → Linear shape under different key names, mapped at load time)."""
from __future__ import annotations

import torch
from torch import nn

from edgelmm.models.layers import activation


class Projector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
