"""SigLIP and CLIP vision towers, built only up to the encoder layer whose output is used."""
from __future__ import annotations

import math

import torch
from torch import nn

from edgelmm.config import VisionConfig
from edgelmm.models.layers import LayerNorm, UsesKernels, activation


class Embeddings(nn.Module):
    """Patch embedding + learned positions; CLIP also prepends a class token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        clip = cfg.arch == "clip"
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=not clip)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)
        if clip:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        if self.cfg.arch == "clip":
            cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
            x = torch.cat((cls.to(x.dtype), x), dim=1)  # (B, 1+h*w, D)
        return (x + self.position_embedding.weight).contiguous()  # (B, N, D)


class SelfAttention(UsesKernels):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        head_dim = d // self.heads
        q, k, v = (p(x).view(b, n, self.heads, head_dim).transpose(1, 2)  # (B, H, N, Dh)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = self.ops.prefill_attention(q, k, v, torch.empty_like(q), 1.0 / math.sqrt(head_dim), False)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """ViT encoder truncated after ``cfg.num_layers`` layers. ``forward`` returns the image tokens
    [B, num_image_tokens, D]: the selected layer's output, with the first token dropped when the family
    does so (CLIP's class token; TinyLLaVA Factory drops SigLIP's top-left patch too)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        if cfg.arch == "clip":
            self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)  # sic: HF's spelling
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)  # (B, N, D)
        if self.cfg.arch == "clip":
            x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.cfg.drop_first_token else x
