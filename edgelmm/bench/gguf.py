"""An HF causal-LM folder (bench_models.hf_language_model) as a GGUF file for llama.cpp, quantized to Q4_0 or
Q8_0 with the ``gguf`` package, streamed one tensor at a time::

    python -m edgelmm.bench.gguf HF_LM_FOLDER OUT.gguf Q4_0

Tensor names come from gguf's own HF name map; Llama-style q/k rows are permuted to llama.cpp's rotary
layout and Gemma's (1 + w) norm gains are baked in, as llama.cpp expects. As ``llama-quantize`` does for its
Q4_0 type, the output (LM head) is kept at higher precision (Q8_0 here; llama.cpp picks Q6_K); norms and
biases stay F32. The vocabulary is synthetic (byte tokens, padded to the embedding's rows): the benchmark
feeds token ids, so llama.cpp's tokenizer is never used."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ARCHS = {"phi": "PHI2", "llama": "LLAMA", "gemma": "GEMMA", "qwen2": "QWEN2"}
QTYPES = ("Q4_0", "Q8_0")


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (byte-level BPE vocabulary)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _vocab(n: int) -> list[str]:
    tokens = [*_byte_tokens(), "<|endoftext|>", "ĠĠ"]
    return tokens + [f"[PAD{i}]" for i in range(n - len(tokens))]


def _metadata(w, cfg: dict, arch: str, vocab: int) -> None:
    import gguf

    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    if arch == "phi":
        w.add_layer_norm_eps(cfg["layer_norm_eps"])
        w.add_rope_dimension_count(int(cfg["partial_rotary_factor"] * head_dim))
    else:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    tokens = _vocab(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" or t.startswith("[PAD") else
                       gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows → llama.cpp's interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(folder: Path, cfg: dict, arch: str):
    """(gguf name, fp32 array) per tensor, in file order, prepared as llama.cpp expects."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHS[arch]), cfg["num_hidden_layers"])
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ValueError(f"no GGUF name for {key}")
                data = f.get_tensor(key).float().numpy()
                if arch in ("llama", "qwen2") and key.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = cfg["num_attention_heads"] if "q_proj" in key else cfg["num_key_value_heads"]
                    data = _permute(data, heads)
                if arch == "gemma" and key.endswith("norm.weight"):
                    data = data + 1
                yield name, data


def _qtype(name: str, data: np.ndarray, qtype: str):
    import gguf

    if data.ndim < 2 or data.shape[-1] % 32:
        return None
    return gguf.GGMLQuantizationType[("Q8_0" if name == "output.weight" else qtype)]


def write_gguf(folder: Path, out: Path, qtype: str = "Q4_0") -> Path:
    """Write ``folder``'s language model as ``out`` (GGUF, ``qtype`` in QTYPES); two passes over the weights
    (shapes, then data), so only one tensor is in memory at a time."""
    import gguf

    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}")
    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg["model_type"]
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHS[arch])])
    w.add_name(f"edgelmm benchmark {arch} {qtype}")
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    _metadata(w, cfg, arch, cfg["vocab_size"])
    for name, data in _tensors(folder, cfg, arch):
        q = _qtype(name, data, qtype)
        if q is None:
            w.add_tensor_info(name, data.shape, np.dtype(np.float32), data.nbytes)
        else:
            shape = gguf.quant_shape_to_byte_shape(data.shape, q)
            w.add_tensor_info(name, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, data in _tensors(folder, cfg, arch):
        q = _qtype(name, data, qtype)
        w.write_tensor_data(data if q is None else gguf.quants.quantize(data, q))
    w.close()
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(write_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
