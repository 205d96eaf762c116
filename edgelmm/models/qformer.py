"""BLIP-2's Q-Former as MiniGPT-4 / TinyGPT-V run it (LAVIS ``Qformer.py`` via ``init_Qformer``): a BERT-base
encoder over learned query tokens only, with cross-attention to the image features every
``cross_attention_freq`` layers and the query FFN (``intermediate_query`` / ``output_query``). The word and
position embeddings and the text FFN are removed upstream, so only the embedding LayerNorm remains.
Parameter names follow the BLIP-2 checkpoint (``Qformer.bert.encoder.layer.N...``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelmm.config import QFormerConfig
from edgelmm.models.layers import activation


class Heads(nn.Module):
    """BERT self-attention projections; keys and values read ``kv_width``-wide inputs (the image for cross)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, d = x.shape[0], x.shape[-1]
        q, k, v = (p(t).view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, H, N, Dh)
                   for p, t in ((self.query, x), (self.key, context), (self.value, context)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, Dh); every position visible
        return out.transpose(1, 2).reshape(b, -1, d)  # (B, Q, D)


class AddNorm(nn.Module):
    """BERT's output block: LayerNorm(dense(x) + residual)."""

    def __init__(self, cfg: QFormerConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.self = Heads(cfg, kv_width)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, context), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        if index % cfg.cross_attention_freq == 0:
            self.crossattention = Attention(cfg, cfg.encoder_width)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x)  # (B, Q, D)
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, image)  # (B, Q, D)
        return self.output_query(self.intermediate_query(x), x)


class QFormer(nn.Module):
    """image features [B, N, W] → query outputs [B, num_queries, hidden_size]."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.layernorm(self.query_tokens.expand(image.shape[0], -1, -1))  # (B, Q, D)
        image = image.to(x.dtype)
        for layer in self.layer:
            x = layer(x, image)
        return x
