"""Small building blocks shared by the vision towers and decoders: activations, norms, rotary tables."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgelmm.errors import ConfigError

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


class UsesKernels(nn.Module):
    """A module that runs edgelmm.kernels ops; ``bind_kernels`` sets them once when the model loads."""

    ops = None  # KernelOps


def bind_kernels(model: nn.Module, device: torch.device | str) -> None:
    """Choose the kernel implementations for ``device`` once (Triton on CUDA, torch references elsewhere;
    ``EDGELMM_KERNELS`` overrides) and hand them to every module that uses them."""
    from edgelmm.kernels import load_ops

    ops = load_ops(device)
    for module in model.modules():
        if isinstance(module, UsesKernels):
            module.ops = ops


class RMSNorm(UsesKernels):
    """RMSNorm computed in fp32. ``gemma=True`` gives Gemma's ``(1 + w)`` scaling."""

    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.gemma = eps, gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, torch.empty_like(x), self.eps, gemma=self.gemma)


class LayerNorm(UsesKernels):
    """LayerNorm with HF parameter names (weight, bias), run by the kernel ops."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, torch.empty_like(x), self.eps)


def rotary_table(rotary_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, rotary_dim] for rotate-half (NeoX-style) rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (P, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, R)
    return emb.cos(), emb.sin()


def embedding_scale(hidden_size: int) -> float:
    """Gemma multiplies token embeddings by sqrt(hidden_size)."""
    return math.sqrt(hidden_size)
