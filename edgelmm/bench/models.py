"""The model folders a benchmark runs, made once into a cache (``$EDGELMM_CACHE`` or ~/.cache/edgelmm):
full-size random-weight shapes in their real on-disk layout (``shapes/NAME``), edgelmm exports per backend
(``exports/KEY-BACKEND-METHOD-gGROUP-EXPORTER``, made with ``edgelmm export``), and the language model alone as an HF causal-LM
folder (``hf-lm/KEY``: PhiForCausalLM / LlamaForCausalLM / GemmaForCausalLM / Qwen2ForCausalLM) for the peers.
Every folder is written to a temporary folder beside it and renamed when complete."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from edgelmm.checkpoint.staging import staging
from edgelmm.errors import ConfigError, UnsupportedModelError
from edgelmm.families.tinygptv import is_description

SHAPE_DTYPES = {"mipha": "bfloat16"}  # else float16: the released checkpoints' dtypes, fp32 ones halved
EXPORTS = {"gptq4": ["--format", "gptq", "--bits", "4"], "onnx4": ["--format", "onnx", "--bits", "4", "--target", "cpu"]}
EXPORTERS = {"gptq4": ("edgelmm.export.gptq_export",), "onnx4": ("edgelmm.export.onnx_export", "onnx", "onnxruntime")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "generation_config.json")
SHARD_BYTES = 2e9


def shape_folder(name: str, root: Path) -> Path:
    """The checkpoint folder of shape ``name`` (``edgelmm.synthetic.shapes.SHAPES``, or ``tiny``: make-tiny's TinyLLaVA
    Phi-2 + SigLIP), built on first use: random weights of the released sizes in the family's real layout.
    For ``tinygpt-v``, the description file of its released pieces."""
    import torch

    from edgelmm.synthetic.replicas import make_tiny
    from edgelmm.synthetic.shapes import FULL, SHAPES
    from edgelmm.synthetic.tinygptv import make_tiny_tinygptv

    out = root / "shapes" / name
    if name == "tinygpt-v":  # its released pieces plus the description file that names them
        if not out.is_dir():
            print(f"building the full-size random-weight TinyGPT-V in {out} (once)", file=sys.stderr, flush=True)
            make_tiny_tinygptv(out, full=True)
        return out / "tinygpt-v.json"
    if out.is_dir():
        return out
    if name == "tiny":
        return make_tiny("tinyllava", out)
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; choose tiny, tinygpt-v or one of {', '.join(SHAPES)}")
    family, llm, vocab = SHAPES[name]
    vocab = 256000 + 64 if family == "llava-gemma" else vocab  # the converted checkpoint's padded embedding
    dtype = getattr(torch, SHAPE_DTYPES.get(family, "float16"))
    print(f"building the full-size random-weight shape {name} in {out} (once)", file=sys.stderr, flush=True)
    return make_tiny(family, out, llm=llm, sizes=FULL, vocab=vocab, dtype=dtype)


def source_kind(path: Path) -> str:
    """checkpoint, gptq (an edgelmm/GPTQ export), onnx (an ONNX export) or tinygpt-v (a description .json)."""
    from edgelmm.backends.onnx.config import is_onnx_export

    if is_description(path):
        return "tinygpt-v"
    if is_onnx_export(path):
        return "onnx"
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return "gptq" if cfg.get("quantization_config") or (path / "quantize_config.json").is_file() else "checkpoint"


def source_key(path: Path) -> str:
    """A cache key for a model folder: its name plus a hash of its absolute path."""
    return f"{path.name}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


def exporter_missing(backend: str) -> str | None:
    """Why ``backend``'s exporter cannot run here, or None."""
    missing = [m for m in EXPORTERS[backend] if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def exporter_fingerprint() -> str:
    """A hash of the exporter's source (edgelmm.export), so a changed exporter never reuses a stale export."""
    folder = Path(importlib.util.find_spec("edgelmm.export").submodule_search_locations[0])
    digest = hashlib.sha1()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def export_folder(backend: str, source: Path, root: Path, method: str, group_size: int = 128) -> Path:
    """``source`` exported for ``backend`` (gptq4 / onnx4) with ``edgelmm export`` in a child process, once
    per exporter version."""
    out = root / "exports" / f"{source_key(source)}-{backend}-{method}-g{group_size}-{exporter_fingerprint()}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "edgelmm.cli", "export", str(source), "-o", str(out), *EXPORTS[backend],
           "--method", method, "--group-size", str(group_size), "--quiet"]
    print(f"exporting for {backend} (once): {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"`edgelmm export` for {backend} failed: {proc.stderr.strip()[-600:]}")
    return out


def hf_text_config(t) -> dict:
    """The HF causal-LM config.json of an edgelmm TextConfig."""
    cfg = {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
           "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
           "max_position_embeddings": t.max_position_embeddings, "rope_theta": t.rope_theta,
           "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": t.hidden_act}
    if t.arch == "phi":
        return {**cfg, "architectures": ["PhiForCausalLM"], "model_type": "phi", "layer_norm_eps": t.norm_eps,
                "partial_rotary_factor": t.rotary_dim / t.head_dim, "qk_layernorm": False}
    cfg = {**cfg, "rms_norm_eps": t.norm_eps, "head_dim": t.head_dim}
    if t.arch == "gemma":
        return {**cfg, "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_activation": t.hidden_act}
    if t.arch == "qwen2":
        return {**cfg, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
    return {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": t.qkv_bias}


def _hf_name(ours: str) -> str:
    rest = ours[len("text."):]
    return rest if rest.startswith("lm_head.") else "model." + rest


def hf_language_model(source: Path, root: Path) -> Path:
    """The language model of checkpoint ``source`` as an HF causal-LM folder (its weights and dtype as stored,
    the checkpoint's tokenizer files), written once. UnsupportedModelError when HF has no such model."""
    import torch

    from edgelmm.checkpoint.json_file import read_json
    from edgelmm.checkpoint.loader import WeightFiles, map_key
    from edgelmm.families import detect
    from edgelmm.models.text import TextModel
    from edgelmm.synthetic.weights import save_sharded

    out = root / "hf-lm" / source_key(source)
    if out.is_dir():
        return out
    files = WeightFiles(source)
    spec = detect(read_json(source / "config.json"), source, files.keys())
    t = spec.text
    if t.qk_layernorm or t.post_attention_rmsnorm:
        raise UnsupportedModelError("this language model has QK / post-attention norms no HF causal LM has")
    with torch.device("meta"):
        wanted = {"text." + name for name in TextModel(t).state_dict()}
    keys = {_hf_name(n): k for k in files.keys() if (n := map_key(k, spec.key_rules)) in wanted}  # noqa: SIM118
    t.vocab_size = files.shape(keys["model.embed_tokens.weight"])[0]
    dtype = files.get(keys["model.embed_tokens.weight"]).dtype
    size = sum(math.prod(files.shape(k)) for k in keys.values()) * dtype.itemsize

    print(f"writing the language model as an HF folder for the peers (once): {out}", file=sys.stderr, flush=True)
    with staging(out) as tmp:
        (tmp / "config.json").write_text(json.dumps({**hf_text_config(t), "torch_dtype": str(dtype)[6:]}, indent=2))
        state = {name: (lambda k=k: files.get(k)) for name, k in keys.items()}
        save_sharded(state, tmp, dtype, shards=max(1, math.ceil(size / SHARD_BYTES)))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
    return out


def peer_model(peer: str, hf_lm: Path, root: Path, qtype: str = "Q4_0") -> Path:
    """The file or folder a peer runs, converted from the HF language-model folder once in a child process:
    llama.cpp: ``gguf/KEY-QTYPE.gguf`` (edgelmm.bench.gguf); ort-genai: ``ort-genai/KEY-int4`` (built by
    onnxruntime-genai's model builder, int4, CPU)."""
    if peer == "llama.cpp":
        out = root / "gguf" / f"{hf_lm.name}-{qtype}.gguf"
        cmd = [sys.executable, "-m", "edgelmm.bench.gguf", str(hf_lm), str(out), qtype]
    else:
        out = root / "ort-genai" / f"{hf_lm.name}-int4"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_lm), "-o", "{tmp}",
               "-p", "int4", "-e", "cpu", "-c", "{tmp}/.cache"]
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting the language model for {peer} (once): {out}", file=sys.stderr, flush=True)
    if peer == "llama.cpp":
        _check(subprocess.run(cmd, check=False, capture_output=True, text=True), peer)
        return out

    with staging(out) as tmp:
        _check(subprocess.run([c.format(tmp=tmp) for c in cmd], check=False, capture_output=True, text=True), peer)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return out


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise ConfigError(f"converting for {what} failed: {(proc.stderr or proc.stdout).strip()[-600:]}")
