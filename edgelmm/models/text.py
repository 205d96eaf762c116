"""Decoder-only language models: Phi (parallel block, partial rotary), Llama/TinyLlama and Qwen2 (GQA),
Gemma (sqrt(d) embedding scale, (1+w) RMSNorm, GeGLU, MQA). Parameter names follow HF, so a checkpoint
loads after a prefix rename only."""
from __future__ import annotations

import math

import torch
from torch import nn

from edgelmm.config import TextConfig
from edgelmm.models.kv_cache import KVCache
from edgelmm.models.layers import LayerNorm, RMSNorm, UsesKernels, activation, embedding_scale, rotary_table


class Attention(UsesKernels):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        out = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.out_bias)
        if cfg.qk_layernorm:
            self.q_layernorm = LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_layernorm = LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.out_name = cfg.style.out_proj
        self.add_module(self.out_name, out)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                layer: int, start: int) -> torch.Tensor:
        cfg, ops = self.cfg, self.ops
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if cfg.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        if cfg.rotary_dim:
            q = ops.rotary(q, cos, sin, q, cfg.rotary_dim)
            k = ops.rotary(k, cos, sin, k, cfg.rotary_dim)
        keys, values = cache.update(layer, start, k, v)  # (B, Hkv, start+T, D)
        out = torch.empty_like(q)  # (B, H, T, D), laid out as (B, T, H, D)
        if t == 1:
            part_out, part_lse, lens = cache.decode_workspace(cfg.num_heads, start + 1)
            ops.decode_attention(q[:, :, 0], cache.keys(layer), cache.values(layer), lens, out[:, :, 0], self.scale,
                                 part_out=part_out, part_lse=part_lse)
        else:  # causal, aligned to the end: a chunk after a cached prefix sees the whole prefix
            ops.prefill_attention(q, keys, values, out, self.scale, True)
        out = out.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim)
        return self._modules[self.out_name](out)


class MLP(nn.Module):
    """Phi's fc1/fc2 MLP, or the gated (SwiGLU/GeGLU) gate/up/down MLP of Llama, Qwen2 and Gemma."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gated = cfg.style.gated_mlp
        self.act = activation(cfg.hidden_act)
        d, f = cfg.hidden_size, cfg.intermediate_size
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=False)
            self.up_proj = nn.Linear(d, f, bias=False)
            self.down_proj = nn.Linear(f, d, bias=False)
        else:
            self.fc1 = nn.Linear(d, f)
            self.fc2 = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


def _norm(cfg: TextConfig) -> nn.Module:
    if cfg.style.norm == "layer":
        return LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps, gemma=cfg.style.norm == "gemma_rms")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.parallel = cfg.style.parallel_block
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = _norm(cfg)
        if cfg.post_attention_rmsnorm:  # TinyGPT-V's post_layernorm (LlamaRMSNorm, eps 1e-6)
            self.post_layernorm = RMSNorm(cfg.hidden_size, 1e-6)
        if not self.parallel:
            self.post_attention_layernorm = _norm(cfg)

    def forward(self, x, cos, sin, cache, layer, start):
        h = self.input_layernorm(x)
        if self.parallel:  # Phi: attention and MLP both read the same normed input
            attn = self.self_attn(h, cos, sin, cache, layer, start)
            if hasattr(self, "post_layernorm"):
                attn = self.post_layernorm(attn)
            return x + attn + self.mlp(h)
        x = x + self.self_attn(h, cos, sin, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head; ``forward`` takes input embeddings so image
    features can be spliced in before it."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm_name = cfg.style.final_norm
        self.add_module(self.final_norm_name, _norm(cfg))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.init_rope(self.embed_tokens.weight.device)

    def init_rope(self, device: torch.device) -> None:
        """(Re)build the rotary cos/sin tables on ``device`` (after a meta-device build)."""
        cos, sin = rotary_table(self.cfg.rotary_dim, self.cfg.max_position_embeddings, self.cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (P, R)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)  # (P, R)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, D] (scaled by sqrt(D) for Gemma, in the embedding dtype)."""
        x = self.embed_tokens(ids)
        if self.cfg.style.scale_embeddings:
            x = x * torch.tensor(embedding_scale(self.cfg.hidden_size), dtype=x.dtype)
        return x

    def forward(self, embeds: torch.Tensor, cache: KVCache, start: int, last_only: bool = True) -> torch.Tensor:
        """Run embeds [B, T, D] at positions start..start+T, filling the cache; return logits
        [B, 1, V] for the last position (or [B, T, V] when ``last_only`` is False), in fp32."""
        t = embeds.shape[1]
        cos = self.rope_cos[None, start:start + t].to(embeds.dtype)  # (1, T, R)
        sin = self.rope_sin[None, start:start + t].to(embeds.dtype)  # (1, T, R)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start)
        x = self._modules[self.final_norm_name](x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x).float()
