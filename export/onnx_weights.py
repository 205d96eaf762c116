"""The decoder's linears for the ONNX graph: GPTQ tensors (as the GPTQ export packs them) repacked into
``MatMulNBits`` layout (a transpose and a byte view, docs/quant-formats.md §0 item 4 and §3.1), fp ``nn.Linear``
weights transposed for ``MatMul``, and the per-layer fusions (q|k|v, gate|up) concatenated along N."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgelmm.checkpoint.gptq_format import unpack_qzeros
from edgelmm.errors import UnsupportedModelError
from edgelmm.export.onnx_graph import ChannelInt8, Linear, NBits

_FALLBACK_BLOCK = 128  # per-channel (group_size -1) scales are replicated over blocks of this size


def nbits_from_gptq(packed: dict[str, torch.Tensor], bits: int, checkpoint_format: str) -> NBits:
    """Repack one linear's GPTQ tensors: ``qweight [K/pf, N]`` int32 → transpose → bytes ``[N, K*bits/8]``
    → ``[N, k_blocks, blob]`` (zero-padded when K is not a multiple of the block); ``scales [G, N]`` →
    ``[N, G]``; zeros unpacked (v1 +1) and dropped when all equal the default ``2^(bits-1)``."""
    qweight, scales, g_idx = packed["qweight"], packed["scales"], packed["g_idx"]
    k, n, groups = qweight.shape[0] * 32 // bits, qweight.shape[1], scales.shape[0]
    size = int((g_idx == 0).sum()) if groups > 1 else k  # the group size; the last group may be shorter
    block = size if groups > 1 else _FALLBACK_BLOCK
    if groups > 1 and (-(-k // size) != groups or block & (block - 1) or block < 16):
        raise UnsupportedModelError(f"group size {size} cannot be a MatMulNBits block (a power of 2 >= 16)")
    if not torch.equal(g_idx.long(), torch.arange(k) // size):
        raise UnsupportedModelError("act-order GPTQ weights with a permuted g_idx cannot be exported to ONNX; "
                                    "quantize with static groups (edgelmm's --act-order does) or without act-order")
    k_blocks, blob = -(-k // block), block * bits // 8
    raw = qweight.t().contiguous().numpy().view(np.uint8)  # [N, K*bits/8], little-endian
    b = np.zeros((n, k_blocks * blob), np.uint8)
    b[:, :raw.shape[1]] = raw
    scale = scales.float().t().numpy()  # [N, G]
    zeros = unpack_qzeros(packed["qzeros"], bits, checkpoint_format).t().numpy().astype(np.uint8)  # [N, G]
    if groups == 1:
        scale, zeros = np.repeat(scale, k_blocks, 1), np.repeat(zeros, k_blocks, 1)  # [N, k_blocks]
    default = (zeros == 2 ** (bits - 1)).all()
    return NBits(b.reshape(n, k_blocks, blob), np.ascontiguousarray(scale), None if default else zeros, bits, block)


def _bias(module: nn.Module) -> np.ndarray | None:
    return None if module.bias is None else module.bias.detach().float().numpy()


@dataclass(frozen=True)
class Packed:
    """The GPTQ tensors of the quantized linears (module name → qweight/qzeros/scales/g_idx), their bits
    and checkpoint format."""

    results: dict[str, dict[str, torch.Tensor]]
    bits: int
    checkpoint_format: str


@dataclass(frozen=True)
class Int8Channels:
    """Linears quantized to symmetric int8 per output channel (module name → ChannelInt8)."""

    results: dict[str, ChannelInt8]


def channel_int8(weight: torch.Tensor) -> ChannelInt8:
    """Round-to-nearest symmetric int8 per output channel of ``weight [N, K]``: scale = max|w| / 127."""
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [N]
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)  # [N, K]
    return ChannelInt8(q.t().contiguous().numpy(), scales.numpy())


def linear_from(module: nn.Linear, name: str, packed: list[Packed | Int8Channels]) -> Linear:
    """The graph Linear for module ``name``: MatMulNBits or DynamicQuantizeMatMul when one of ``packed``
    holds it, else fp MatMul."""
    for p in packed:
        if name in p.results and isinstance(p, Int8Channels):
            return Linear(module.in_features, module.out_features, int8=p.results[name], bias=_bias(module))
        if name in p.results:
            nbits = nbits_from_gptq(p.results[name], p.bits, p.checkpoint_format)
            return Linear(module.in_features, module.out_features, nbits=nbits, bias=_bias(module))
    w = module.weight.detach().float()  # [N, K]
    return Linear(w.shape[1], w.shape[0], weight_t=w.t().contiguous().numpy(), bias=_bias(module))


def fuse(parts: list[Linear]) -> Linear:
    """Linears sharing an input, concatenated along N (exact: quantization groups run along K)."""
    if len(parts) == 1:
        return parts[0]
    k, n = parts[0].k, sum(p.n for p in parts)
    bias = None
    if any(p.bias is not None for p in parts):
        bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.n, np.float32) for p in parts])
    kinds = {("nbits" if p.nbits is not None else "int8" if p.int8 is not None else "fp") for p in parts}
    if len(kinds) > 1:
        raise UnsupportedModelError("cannot fuse linears of different quantizations that share an input")
    if kinds == {"fp"}:
        return Linear(k, n, weight_t=np.concatenate([p.weight_t for p in parts], 1), bias=bias)
    if kinds == {"int8"}:
        int8 = ChannelInt8(np.concatenate([p.int8.q for p in parts], 1), np.concatenate([p.int8.scales for p in parts]))
        return Linear(k, n, int8=int8, bias=bias)
    q = [p.nbits for p in parts]
    if len({(x.bits, x.block_size) for x in q}) > 1:
        raise UnsupportedModelError("linears sharing an input must use the same bits and block size")
    zeros = None
    if any(x.zeros is not None for x in q):
        zeros = np.concatenate([x.zeros if x.zeros is not None else np.full(x.scales.shape, 2 ** (x.bits - 1), np.uint8)
                                for x in q])
    nbits = NBits(np.concatenate([x.b for x in q]), np.concatenate([x.scales for x in q]), zeros,
                  q[0].bits, q[0].block_size)
    return Linear(k, n, nbits=nbits, bias=bias)


def decoder_linears(text: nn.Module, packed: list[Packed]) -> dict[str, Linear]:
    """Graph linears of a TextModel (module names ``text.…``), fused per layer: ``layers.i.qkv``,
    ``layers.i.o``, ``layers.i.up`` (Phi fc1) or ``layers.i.gate_up``, ``layers.i.down``; and ``lm_head``."""
    def get(module_name: str) -> Linear:
        return linear_from(text.get_submodule(module_name), "text." + module_name, packed)

    out = {}
    for i, layer in enumerate(text.layers):
        p = f"layers.{i}"
        out[f"{p}.qkv"] = fuse([get(f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")])
        out[f"{p}.o"] = get(f"{p}.self_attn.{text.cfg.style.out_proj}")
        if layer.mlp.gated:
            out[f"{p}.gate_up"] = fuse([get(f"{p}.mlp.gate_proj"), get(f"{p}.mlp.up_proj")])
            out[f"{p}.down"] = get(f"{p}.mlp.down_proj")
        else:
            out[f"{p}.up"], out[f"{p}.down"] = get(f"{p}.mlp.fc1"), get(f"{p}.mlp.fc2")
    out["lm_head"] = get("lm_head")
    return out


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def decoder_norms(text: nn.Module) -> dict[str, np.ndarray]:
    """Norm gains (and LayerNorm biases) by graph name, with Gemma's ``1 + w`` folded into the gain."""
    offset = 1.0 if text.cfg.style.norm == "gemma_rms" else 0.0
    out = {}
    kinds = ("input_layernorm", "post_attention_layernorm", "post_layernorm", "self_attn.q_layernorm",
             "self_attn.k_layernorm")  # the last three: TinyGPT-V
    named = [(f"layers.{i}.{n}", layer.get_submodule(n)) for i, layer in enumerate(text.layers)
             for n in kinds if _has(layer, n)]
    named.append(("final_norm", getattr(text, text.cfg.style.final_norm)))
    for name, norm in named:
        out[f"{name}.weight"] = (offset + norm.weight.detach().float()).numpy()
        if getattr(norm, "bias", None) is not None:
            out[f"{name}.bias"] = norm.bias.detach().float().numpy()
    return out
