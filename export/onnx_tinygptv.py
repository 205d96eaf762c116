"""TinyGPT-V's vision graph: ``pixel_values [B, 3, S, S]`` → ``image_features [B, Q, D_text]``.

EVA ViT-g (patch Conv, CLS token, learned positions, pre-norm blocks whose fused q|k|v linear carries the
q and v biases with a zero k bias, com.microsoft ``MultiHeadAttention``, exact-GELU MLP, no final norm) →
``ln_vision`` → the Q-Former (the LayerNorm of the learned queries is a constant, folded at export; per
layer: self-attention over the queries, cross-attention to the image every ``cross_attention_freq`` layers,
the query FFN, each closed by BERT's LayerNorm(dense(x) + residual)) → ``llama_proj`` → ``llama_proj2``.
Linears are fp ``MatMul`` or int8 ``DynamicQuantizeMatMul`` (``--vision-bits 8``).
"""
from __future__ import annotations

import dataclasses

import onnx
import torch
from torch import nn

from edgelmm.config import QFormerConfig
from edgelmm.export.onnx_graph import MS_DOMAIN, GraphBuilder, Linear
from edgelmm.export.onnx_vision import batch_shape, layer_norm, to_numpy
from edgelmm.export.onnx_weights import Int8Channels, Packed, fuse, linear_from


def build_tinygptv_vision(model: nn.Module, packed: list[Packed | Int8Channels], dtype: str = "float32",
                          accuracy_level: int = 0) -> onnx.ModelProto:
    """The vision graph of a loaded TinyGPT-V model (``edgelmm.models.tinygptv.TinyGPTV``)."""
    eva, visual = model.vision, model.spec.vision
    g = GraphBuilder("edgelmm_tinygptv_vision", dtype, accuracy_level)
    size = visual.eva.image_size
    x = g.input("pixel_values", g.onnx_dtype, ["batch", 3, size, size])
    conv = eva.patch_embed.proj
    weight, bias = g.fp("vision.patch.weight", to_numpy(conv.weight)), g.fp("vision.patch.bias", to_numpy(conv.bias))
    x = g.op("Conv", x, weight, bias, kernel_shape=[visual.eva.patch_size] * 2,
             strides=[visual.eva.patch_size] * 2)  # (B, W, G, G)
    x = g.op("Transpose", g.op("Reshape", x, g.const([0, visual.eva.width, -1])), perm=[0, 2, 1])  # (B, G*G, W)
    cls = g.op("Expand", g.fp("vision.cls_token", to_numpy(eva.cls_token)), batch_shape(g, x, visual.eva.width))
    x = g.op("Add", g.op("Concat", cls, x, axis=1), g.fp("vision.pos_embed", to_numpy(eva.pos_embed)))  # (B, 1+G*G, W)
    for i, block in enumerate(eva.blocks):
        x = _eva_block(g, x, block, f"vision.blocks.{i}", visual.eva.heads, packed)
    image = layer_norm(g, x, model.ln_vision, "ln_vision")  # (B, 1+G*G, W)

    qformer = model.qformer
    with torch.no_grad():
        queries = qformer.layernorm(qformer.query_tokens.float())  # (1, Q, Hq): a constant
    q = g.op("Expand", g.fp("qformer.queries", to_numpy(queries)), batch_shape(g, x, qformer.cfg.hidden_size))
    for i, layer in enumerate(qformer.layer):
        q = _qformer_layer(g, q, image, layer, f"qformer.layer.{i}", qformer.cfg, packed)
    h = g.linear(q, linear_from(model.llama_proj, "llama_proj", packed), "llama_proj")
    g.node("Identity", [g.linear(h, linear_from(model.llama_proj2, "llama_proj2", packed), "llama_proj2")],
           outputs=["image_features"])
    g.output("image_features", g.onnx_dtype, ["batch", visual.num_image_tokens, model.spec.text.hidden_size])
    return g.model()


def _eva_block(g: GraphBuilder, x: str, block: nn.Module, name: str, heads: int,
               packed: list[Packed | Int8Channels]) -> str:
    attn = block.attn
    zero = torch.zeros_like(attn.v_bias)
    qkv = linear_from(attn.qkv, f"{name}.attn.qkv", packed)
    qkv = dataclasses.replace(qkv, bias=to_numpy(torch.cat((attn.q_bias, zero, attn.v_bias))))  # k bias is zero
    h = g.linear(layer_norm(g, x, block.norm1, f"{name}.norm1"), qkv, f"{name}.qkv")  # (B, N, 3W)
    q, k, v = g.node("Split", [h], n_out=3, axis=-1, num_outputs=3)
    a = g.op("MultiHeadAttention", q, k, v, domain=MS_DOMAIN, num_heads=heads)  # (B, N, W)
    x = g.op("Add", x, g.linear(a, linear_from(attn.proj, f"{name}.attn.proj", packed), f"{name}.proj"))
    h = layer_norm(g, x, block.norm2, f"{name}.norm2")
    h = g.activation(g.linear(h, linear_from(block.mlp.fc1, f"{name}.mlp.fc1", packed), f"{name}.fc1"), "gelu")
    return g.op("Add", x, g.linear(h, linear_from(block.mlp.fc2, f"{name}.mlp.fc2", packed), f"{name}.fc2"))


def _add_norm(g: GraphBuilder, x: str, residual: str, block: nn.Module, name: str,
              packed: list[Packed | Int8Channels]) -> str:
    """BERT's output block: LayerNorm(dense(x) + residual)."""
    h = g.op("Add", g.linear(x, linear_from(block.dense, f"{name}.dense", packed), f"{name}.dense"), residual)
    return layer_norm(g, h, block.LayerNorm, f"{name}.LayerNorm")


def _attention(g: GraphBuilder, x: str, context: str | None, attention: nn.Module, name: str, heads: int,
               packed: list[Packed | Int8Channels]) -> str:
    """Self-attention (``context`` None: q|k|v from ``x``) or cross-attention (k|v from ``context``)."""
    def lin(part: str) -> Linear:
        return linear_from(attention.self.get_submodule(part), f"{name}.self.{part}", packed)

    if context is None:
        q, k, v = g.node("Split", [g.linear(x, fuse([lin("query"), lin("key"), lin("value")]), f"{name}.qkv")],
                         n_out=3, axis=-1, num_outputs=3)
    else:
        q = g.linear(x, lin("query"), f"{name}.query")
        k, v = g.node("Split", [g.linear(context, fuse([lin("key"), lin("value")]), f"{name}.kv")],
                      n_out=2, axis=-1, num_outputs=2)
    a = g.op("MultiHeadAttention", q, k, v, domain=MS_DOMAIN, num_heads=heads)  # (B, Q, Hq)
    return _add_norm(g, a, x, attention.output, f"{name}.output", packed)


def _qformer_layer(g: GraphBuilder, x: str, image: str, layer: nn.Module, name: str, cfg: QFormerConfig,
                   packed: list[Packed | Int8Channels]) -> str:
    x = _attention(g, x, None, layer.attention, f"{name}.attention", cfg.num_heads, packed)
    if hasattr(layer, "crossattention"):
        x = _attention(g, x, image, layer.crossattention, f"{name}.crossattention", cfg.num_heads, packed)
    h = layer.intermediate_query.dense
    h = g.activation(g.linear(x, linear_from(h, f"{name}.intermediate_query.dense", packed),
                              f"{name}.intermediate_query.dense"), cfg.hidden_act)
    return _add_norm(g, h, x, layer.output_query, f"{name}.output_query", packed)
