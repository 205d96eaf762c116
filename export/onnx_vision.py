"""The vision and embedding graphs of an ONNX export, written with onnx.helper.

vision: ``pixel_values [B, 3, S, S]`` → patch Conv + positions (CLIP: class token, pre-LayerNorm) → the
encoder layers up to the feature layer (LayerNorm, q|k|v linear, com.microsoft ``MultiHeadAttention``,
MLP) → first token dropped when the family does → projector → ``image_features [B, N, D_text]``. Linears
are fp ``MatMul``, int8 ``DynamicQuantizeMatMul`` (``--vision-bits 8``) or ``MatMulNBits`` (``--quantize-vision``).

embedding: ``input_ids [B, S]`` + ``image_features`` → ``inputs_embeds [B, S, D]``: ids equal to an image id
take the next image feature row (a running count over the image positions indexes the flattened features),
the others their token embedding (Gemma: times sqrt(D)).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from torch import nn

from edgelmm.export.onnx_graph import MS_DOMAIN, GraphBuilder, Linear
from edgelmm.export.onnx_weights import Int8Channels, Packed, fuse, linear_from
from edgelmm.models.layers import embedding_scale


def to_numpy(t) -> np.ndarray:
    """A tensor as a float32 numpy array."""
    return t.detach().float().numpy()


def build_vision(model: nn.Module, packed: list[Packed | Int8Channels], dtype: str = "float32",
                 accuracy_level: int = 0) -> onnx.ModelProto:
    """The vision graph of a VLM (its vision tower and projector); linears held by ``packed`` are quantized."""
    cfg = model.spec.vision
    g = GraphBuilder("edgelmm_vision", dtype, accuracy_level)
    x = g.input("pixel_values", g.onnx_dtype, ["batch", 3, cfg.image_size, cfg.image_size])
    emb = model.vision.embeddings
    conv = [g.fp("vision.patch.weight", to_numpy(emb.patch_embedding.weight))]
    if emb.patch_embedding.bias is not None:
        conv.append(g.fp("vision.patch.bias", to_numpy(emb.patch_embedding.bias)))
    x = g.op("Conv", x, *conv, kernel_shape=[cfg.patch_size] * 2, strides=[cfg.patch_size] * 2)  # (B, D, h, w)
    x = g.op("Transpose", g.op("Reshape", x, g.const([0, cfg.hidden_size, -1])), perm=[0, 2, 1])  # (B, h*w, D)
    if cfg.arch == "clip":
        cls = g.op("Expand", g.fp("vision.class_embedding", to_numpy(emb.class_embedding).reshape(1, 1, -1)),
                   batch_shape(g, x, cfg.hidden_size))
        x = g.op("Concat", cls, x, axis=1)  # (B, 1+h*w, D)
    x = g.op("Add", x, g.fp("vision.position_embedding", to_numpy(emb.position_embedding.weight)))
    if cfg.arch == "clip":
        x = layer_norm(g, x, model.vision.pre_layrnorm, "vision.pre_layrnorm")
    for i, layer in enumerate(model.vision.layers):
        x = _encoder_layer(g, x, layer, f"vision.layers.{i}", cfg, packed)
    if cfg.drop_first_token:
        x = g.op("Slice", x, g.const([1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
    proj = model.projector
    h = g.linear(x, linear_from(proj.linear_1, "projector.linear_1", packed), "projector.linear_1")
    h = g.activation(h, model.spec.projector_act)
    g.node("Identity", [g.linear(h, linear_from(proj.linear_2, "projector.linear_2", packed), "projector.linear_2")],
           outputs=["image_features"])
    g.output("image_features", g.onnx_dtype, ["batch", cfg.num_image_tokens, model.spec.text.hidden_size])
    return g.model()


def batch_shape(g: GraphBuilder, x: str, width: int) -> str:
    """[B, 1, width] for expanding a [1, n, width] constant to the batch of ``x``."""
    batch = g.op("Gather", g.op("Shape", x), g.const([0]), axis=0)  # (1,)
    return g.op("Concat", batch, g.const([1, width]), axis=0)


def layer_norm(g: GraphBuilder, x: str, norm: nn.Module, name: str) -> str:
    """``norm`` (an nn.LayerNorm) as a LayerNormalization node."""
    weight, bias = g.fp(f"{name}.weight", to_numpy(norm.weight)), g.fp(f"{name}.bias", to_numpy(norm.bias))
    return g.op("LayerNormalization", x, weight, bias, epsilon=norm.eps, axis=-1)


def _encoder_layer(g: GraphBuilder, x: str, layer: nn.Module, name: str, cfg,
                   packed: list[Packed | Int8Channels]) -> str:
    def lin(module_name: str) -> Linear:
        return linear_from(layer.get_submodule(module_name), f"{name}.{module_name}", packed)

    h = layer_norm(g, x, layer.layer_norm1, f"{name}.layer_norm1")
    qkv = g.linear(h, fuse([lin(f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")]), f"{name}.qkv")
    q, k, v = g.node("Split", [qkv], n_out=3, axis=-1, num_outputs=3)
    a = g.op("MultiHeadAttention", q, k, v, domain=MS_DOMAIN, num_heads=cfg.num_heads)
    x = g.op("Add", x, g.linear(a, lin("self_attn.out_proj"), f"{name}.out_proj"))
    h = layer_norm(g, x, layer.layer_norm2, f"{name}.layer_norm2")
    h = g.activation(g.linear(h, lin("mlp.fc1"), f"{name}.fc1"), cfg.hidden_act)
    return g.op("Add", x, g.linear(h, lin("mlp.fc2"), f"{name}.fc2"))


def build_embedding(model: nn.Module, image_ids: list[int], table_dtype: str,
                    dtype: str = "float32") -> onnx.ModelProto:
    """The embedding graph: the token table stored as ``table_dtype`` (cast to ``dtype`` after the gather)."""
    text = model.text
    d = text.cfg.hidden_size
    g = GraphBuilder("edgelmm_embedding", dtype)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    feats = g.input("image_features", g.onnx_dtype, ["image_batch", "image_tokens", d])
    is_img = g.op("Equal", ids, g.const(image_ids[0]))
    for other in image_ids[1:]:
        is_img = g.op("Or", is_img, g.op("Equal", ids, g.const(other)))  # (B, S) bool
    table = g.init("embed_tokens.weight", to_numpy(text.embed_tokens.weight).astype(table_dtype))
    tok = g.op("Gather", table, g.op("Where", is_img, g.const(0), ids), axis=0)  # (B, S, D)
    if table_dtype != dtype:
        tok = g.op("Cast", tok, to=g.onnx_dtype)
    if text.cfg.style.scale_embeddings:
        tok = g.op("Mul", tok, g.const(embedding_scale(d), g.np_dtype))
    flat = g.op("Reshape", g.op("Cast", is_img, to=TensorProto.INT64), g.const([-1]))  # (B*S,)
    index = g.op("Max", g.op("Sub", g.op("CumSum", flat, g.const(0)), g.const(1)), g.const(0))  # (B*S,)
    rows = g.op("Gather", g.op("Reshape", feats, g.const([-1, d])), index, axis=0)  # (B*S, D)
    img = g.op("Reshape", rows, g.op("Shape", tok))  # (B, S, D)
    g.node("Where", [g.op("Unsqueeze", is_img, g.const([-1])), img, tok], outputs=["inputs_embeds"])
    g.output("inputs_embeds", g.onnx_dtype, ["batch", "seq", d])
    return g.model()
