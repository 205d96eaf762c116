"""EVA ViT-g/14 as BLIP-2, MiniGPT-4 and TinyGPT-V use it (LAVIS ``create_eva_vit_g``): pre-norm blocks with
a fused bias-free ``qkv`` plus separate q/v biases (the k bias is zero), exact-GELU MLP, a CLS token, learned
absolute positions, and no final norm: every token of the last block is returned. Parameter names follow
``eva_vit_g.pth`` so the checkpoint loads after a prefix rename only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelmm.config import EvaConfig
from edgelmm.errors import ConfigError


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, G*G, D)


class Attention(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # (3D,)
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    """pixels [B, 3, S, S] → all tokens of the last block [B, 1+(S/p)^2, D] (CLS first, no final norm)."""

    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))  # already at image_size
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ConfigError(f"EVA expects {self.cfg.image_size}x{self.cfg.image_size} pixels, got "
                              f"{tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels.to(self.cls_token.dtype))  # (B, G*G, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed  # (B, 1+G*G, D)
        for block in self.blocks:
            x = block(x)
        return x
