"""Small building blocks shared by the vision towers and decoders: activations, norms, rotary tables."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


def activation(name: str):
    """The activation function HF names ``name``."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported activation {name!r}; edgelmm knows {sorted(_ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. ``offset=1.0`` gives Gemma's ``(1 + w)`` scaling."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma multiplies in fp32, then casts
            return (xf * (self.offset + self.weight.float())).type_as(x)
        return self.weight * xf.type_as(x)


def rotary_table(rotary_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, rotary_dim] for rotate-half (NeoX-style) rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (P, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, R)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x [B, H, T, D] (partial rotary passes the rest through)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    x_rot = x_rot * cos + rotated * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


def embedding_scale(hidden_size: int) -> float:
    """Gemma multiplies token embeddings by sqrt(hidden_size)."""
    return math.sqrt(hidden_size)
