"""The decoder graph, written op by op with onnx.helper (not traced), in onnxruntime-genai's I/O layout
(edgelmm/backends/onnx/config.py).

Per layer: fused q|k|v linear → com.microsoft ``GroupQueryAttention`` over the KV cache (past and present
may share one buffer) → o linear; the MLP as fused gate|up → activation → down (Llama, Qwen2, Gemma) or
fc1 → FastGelu → fc2 (Phi, in parallel with attention). Linears are ``MatMulNBits`` when quantized.
Norms are fused with the residual add: ``SkipSimplifiedLayerNormalization`` (RMSNorm; Gemma's ``1 + w``
folded into the gain at export) or ``SkipLayerNormalization`` (Phi's LayerNorm). TinyGPT-V's modified Phi-2
adds a LayerNorm over each head's q and k before rotary and an RMSNorm on the attention output.

Rotary: GQA applies it itself (``do_rotary``) when its kernel supports the family's rotary width — rotate-half
on the first ``rotary_dim`` dims, with ``rotary_dim / 2`` a multiple of 8 and at most ``head_dim / 2``
(Phi-2's partial rotary, 32 of 80 dims, qualifies; the rest of each head passes through). Otherwise (e.g.
tiny test models) q and k go through ``RotaryEmbedding`` with ``rotary_embedding_dim`` first, at positions
derived from the attention mask. Only the last position reaches the LM head, so the last layer goes on past
its attention (o linear, MLP, norms) with that position alone: its keys and values are all the cache needs of
the others (counting operations, a prompt's prefill does about 2% less work on Phi-2's 32 layers).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from edgelmm.backends.onnx.config import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE
from edgelmm.config import TextConfig
from edgelmm.export.onnx_graph import MS_DOMAIN, GraphBuilder, Linear
from edgelmm.models.layers import rotary_table


def fused_rotary(cfg: TextConfig) -> bool:
    """Whether GroupQueryAttention's own rotary (do_rotary) supports this model's rotary width."""
    half = cfg.rotary_dim // 2
    return half % 8 == 0 and 0 < half <= cfg.head_dim // 2


def build_decoder(cfg: TextConfig, linears: dict[str, Linear], norms: dict[str, np.ndarray], dtype: str = "float32",
                  accuracy_level: int = 0) -> onnx.ModelProto:
    """The decoder ModelProto of a TextModel given its graph linears and norm weights
    (export/onnx_weights.py ``decoder_linears`` / ``decoder_norms``)."""
    g = GraphBuilder("edgelmm_decoder", dtype, accuracy_level)
    return _Decoder(cfg, g, linears, norms).build()


class _Decoder:
    def __init__(self, cfg: TextConfig, g: GraphBuilder, linears: dict[str, Linear], norms: dict[str, np.ndarray]):
        self.cfg, self.g, self.lin, self.norms = cfg, g, linears, norms
        self.rms = cfg.style.norm != "layer"
        self.fused_rotary = fused_rotary(cfg)

    def build(self) -> onnx.ModelProto:
        cfg, g = self.cfg, self.g
        x = g.input("inputs_embeds", g.onnx_dtype, ["batch", "seq", cfg.hidden_size])
        mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_seq"])
        self._attention_inputs(x, mask)
        h = self._first_norm(x)
        for i in range(cfg.num_layers):
            x, h = self._layer(i, x, h)  # the last layer's: the last position only, (B, 1, D)
        g.node("Identity", [g.linear(h, self.lin["lm_head"], "lm_head")], outputs=["logits"])
        g.output("logits", g.onnx_dtype, ["batch", 1, cfg.vocab_size])
        return g.model()

    def _attention_inputs(self, x: str, mask: str) -> None:
        """seqlens_k = sum(mask) - 1 and total_seq_len = mask width (int32), as genai wires GQA; the
        rotary cos/sin caches; explicit position ids when rotary is not fused."""
        g, cfg = self.g, self.cfg
        summed = g.op("ReduceSum", mask, g.const([1]), keepdims=0)  # (B,)
        self.seqlens_k = g.op("Cast", g.op("Sub", summed, g.const(1)), to=TensorProto.INT32)
        total = g.op("Gather", g.op("Shape", mask), g.const(1), axis=0)  # scalar int64
        self.total_len = g.op("Cast", total, to=TensorProto.INT32)
        cos, sin = rotary_table(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta)  # (P, R)
        half = cfg.rotary_dim // 2
        self.cos = g.fp("rotary.cos_cache", cos[:, :half].numpy())
        self.sin = g.fp("rotary.sin_cache", sin[:, :half].numpy())
        if not self.fused_rotary:
            seq = g.op("Gather", g.op("Shape", x), g.const(1), axis=0)
            positions = g.op("Range", g.op("Sub", total, seq), total, g.const(1))  # (S,)
            self.position_ids = g.op("Unsqueeze", positions, g.const([0]))  # (1, S)

    def _first_norm(self, x: str) -> str:
        return self._rms(x, "layers.0.input_layernorm", self.cfg.norm_eps) if self.rms else \
            self._layer_norm(x, "layers.0.input_layernorm")

    def _rms(self, x: str, name: str, eps: float) -> str:
        """RMSNorm as plain ops (onnx.checker rejects the contrib SimplifiedLayerNormalization); fp32 math."""
        g = self.g
        xf = g.op("Cast", x, to=TensorProto.FLOAT)
        mean_sq = g.op("ReduceMean", g.op("Mul", xf, xf), g.const([-1]), keepdims=1)
        inv_rms = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_sq, g.const(eps, np.float32))))
        return g.op("Mul", g.op("Cast", g.op("Mul", xf, inv_rms), to=g.onnx_dtype),
                    g.fp(f"{name}.weight", self.norms[f"{name}.weight"]))

    def _layer_norm(self, x: str, name: str) -> str:
        g = self.g
        w, b = (g.fp(f"{name}.{p}", self.norms[f"{name}.{p}"]) for p in ("weight", "bias"))
        return g.op("LayerNormalization", x, w, b, epsilon=self.cfg.norm_eps, axis=-1)

    def _head_norm(self, x: str, name: str, heads: int) -> str:
        """TinyGPT-V's QK LayerNorm over each head's dims: (B, S, heads*Dh) → per head → (B, S, heads*Dh)."""
        g, d = self.g, self.cfg.head_dim
        per_head = g.op("Reshape", x, g.const([0, 0, heads, d]))  # (B, S, heads, Dh)
        return g.op("Reshape", self._layer_norm(per_head, name), g.const([0, 0, heads * d]))

    def _skip_norm(self, y: str, residual: str, name: str) -> tuple[str, str]:
        """(norm(y + residual), y + residual) in one fused op."""
        g = self.g
        w = g.fp(f"{name}.weight", self.norms[f"{name}.weight"])
        if self.rms:
            out = g.node("SkipSimplifiedLayerNormalization", [y, residual, w], n_out=4, domain=MS_DOMAIN,
                         epsilon=self.cfg.norm_eps)
        else:
            b = g.fp(f"{name}.bias", self.norms[f"{name}.bias"])
            out = g.node("SkipLayerNormalization", [y, residual, w, b], n_out=4, domain=MS_DOMAIN,
                         epsilon=self.cfg.norm_eps)
        return out[0], out[3]

    def _next_norm(self, i: int) -> str:
        return f"layers.{i + 1}.input_layernorm" if i + 1 < self.cfg.num_layers else "final_norm"

    def _last_position(self, t: str) -> str:
        """(B, S, D) -> (B, 1, D)."""
        return self.g.op("Slice", t, self.g.const([-1]), self.g.const([np.iinfo(np.int64).max]), self.g.const([1]))

    def _layer(self, i: int, x: str, h: str) -> tuple[str, str]:
        """Layer i given its input residual x and normed input h; returns (residual, next normed input), of the
        last position only for the last layer."""
        last = i == self.cfg.num_layers - 1
        attn = self._attention(i, h, last)
        if last:
            x = self._last_position(x)
        if not self.rms:  # Phi: x + attn(h) + mlp(h)
            if last:
                h = self._last_position(h)
            mlp = self.g.linear(self._act(self.g.linear(h, self.lin[f"layers.{i}.up"], f"layers.{i}.up")),
                                self.lin[f"layers.{i}.down"], f"layers.{i}.down")
            h, x = self._skip_norm(self.g.op("Add", attn, mlp), x, self._next_norm(i))
            return x, h
        h, x = self._skip_norm(attn, x, f"layers.{i}.post_attention_layernorm")
        gate_up = self.g.linear(h, self.lin[f"layers.{i}.gate_up"], f"layers.{i}.gate_up")
        gate, up = self.g.node("Split", [gate_up], n_out=2, axis=-1, num_outputs=2)
        mlp = self.g.linear(self.g.op("Mul", self._act(gate), up), self.lin[f"layers.{i}.down"], f"layers.{i}.down")
        h, x = self._skip_norm(mlp, x, self._next_norm(i))
        return x, h

    def _act(self, x: str) -> str:
        return self.g.activation(x, self.cfg.hidden_act)

    def _attention(self, i: int, h: str, last_position: bool = False) -> str:
        """Layer i's attention output (every position's keys and values into the cache; with last_position,
        the output of the last one alone)."""
        g, cfg = self.g, self.cfg
        qkv = g.linear(h, self.lin[f"layers.{i}.qkv"], f"layers.{i}.qkv")  # (B, S, (H + 2 Hkv) Dh)
        shape = ["batch", cfg.num_kv_heads, "past_seq", cfg.head_dim]
        past_k = g.input(PAST_KEY % i, g.onnx_dtype, shape)
        past_v = g.input(PAST_VALUE % i, g.onnx_dtype, shape)
        present = [PRESENT_KEY % i, PRESENT_VALUE % i]
        for name in present:
            g.output(name, g.onnx_dtype, ["batch", cfg.num_kv_heads, "present_seq", cfg.head_dim])
        if self.fused_rotary and not cfg.qk_layernorm:
            qkv_inputs = [qkv, "", ""]
        else:
            q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            q, k, v = g.node("Split", [qkv, g.const([q_dim, kv_dim, kv_dim])], n_out=3, axis=-1)
            if cfg.qk_layernorm:  # before rotary, as the modified Phi-2 does
                q = self._head_norm(q, f"layers.{i}.self_attn.q_layernorm", cfg.num_heads)
                k = self._head_norm(k, f"layers.{i}.self_attn.k_layernorm", cfg.num_kv_heads)
            if not self.fused_rotary:
                q, k = (g.op("RotaryEmbedding", t, self.position_ids, self.cos, self.sin, domain=MS_DOMAIN,
                             num_heads=heads, rotary_embedding_dim=cfg.rotary_dim, interleaved=0)
                        for t, heads in ((q, cfg.num_heads), (k, cfg.num_kv_heads)))
            qkv_inputs = [q, k, v]
        rotary = [self.cos, self.sin] if self.fused_rotary else []
        out = g.node("GroupQueryAttention", [*qkv_inputs, past_k, past_v, self.seqlens_k, self.total_len, *rotary],
                     outputs=[f"layers.{i}.attn/out", *present], domain=MS_DOMAIN, name=f"layers.{i}.attn",
                     num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, do_rotary=int(self.fused_rotary),
                     rotary_interleaved=0)[0]
        if last_position:
            out = self._last_position(out)
        out = g.linear(out, self.lin[f"layers.{i}.o"], f"layers.{i}.o")
        if cfg.post_attention_rmsnorm:  # TinyGPT-V's post_layernorm (LlamaRMSNorm, eps 1e-6)
            out = self._rms(out, f"layers.{i}.post_layernorm", 1e-6)
        return out
