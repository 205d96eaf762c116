"""Writing a GPTQ export folder in the source checkpoint's own layout (docs/quant-formats.md §1).

Every tensor of the source checkpoint is written under its own key, so family detection and other tools
still recognise the folder: each quantized linear's ``<prefix>.weight`` becomes ``<prefix>.qweight`` /
``.qzeros`` / ``.scales`` / ``.g_idx`` (its ``.bias`` stays, in fp16), every other floating-point tensor is
written in fp16, integer tensors as they are. Weights go to ``model-0000i-of-0000n.safetensors`` shards
with a ``model.safetensors.index.json``. config.json gains ``quantization_config`` (mirrored in
``quantize_config.json``); tokenizer, processor and other side files are copied. Legacy TinyLLaVA's
separate vision tower folder is written the same way into a subfolder that config.json points at.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgelmm.checkpoint.json_file import read_json
from edgelmm.checkpoint.loader import WeightFiles, map_key
from edgelmm.errors import QuantizationError
from edgelmm.spec import ModelSpec

SHARD_BYTES = 1 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
REWRITTEN = ("config.json", "quantize_config.json", "edgelmm.json")
Packed = dict[str, dict[str, torch.Tensor]]  # module name in the VLM -> {"qweight": ..., "qzeros": ..., ...}


def _tensors(files: WeightFiles, rules, results: Packed):
    """Yield the output (key, tensor) pairs for one weight source, one source tensor at a time."""
    for key in sorted(files.keys()):
        name = map_key(key, rules) or ""
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if module in results:
            prefix = key[:-len("weight")]
            for part, tensor in results[module].items():
                yield prefix + part, tensor
            continue
        tensor = files.get(key)
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
            if not torch.isfinite(tensor).all():
                raise QuantizationError(f"{key} overflows fp16; this checkpoint cannot be exported in fp16")
        yield key, tensor


def write_weights(files: WeightFiles, rules, results: Packed, dest: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write one weight source as safetensors shards plus ``model.safetensors.index.json`` into ``dest``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[str] = []

    def flush() -> None:
        names.append(f".shard-{len(names)}.safetensors")
        save_file(shards[-1], dest / names[-1], metadata={"format": "pt"})
        shards[-1] = {}

    weight_of: dict[str, int] = {}
    total = 0
    for key, tensor in _tensors(files, rules, results):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][key] = tensor.contiguous()
        weight_of[key] = len(names)
        size += nbytes
        total += nbytes
    flush()
    final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    for tmp, name in zip(names, final):
        (dest / tmp).rename(dest / name)
        (dest / name).chmod(0o644)  # safetensors creates files owner-only; an export is meant to be shared
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[i] for k, i in sorted(weight_of.items())}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dest: Path, keep_config: bool) -> None:
    """Copy the top-level files of ``src`` that are not weights (tokenizer, processor, generation config,
    chat template, code, README); config.json too when ``keep_config``."""
    for path in sorted(src.iterdir()):
        name = path.name
        skip = (name.startswith(".") or not path.is_file() or name.endswith(WEIGHT_SUFFIXES)
                or name.endswith(".index.json") or (name in REWRITTEN and not (keep_config and name == "config.json")))
        if not skip:
            shutil.copy2(path, dest / name)


def block_name(spec: ModelSpec) -> str:
    """The checkpoint prefix of the decoder layers (e.g. ``language_model.model.layers``)."""
    return next(ckpt for ckpt, ours in spec.key_rules if ours == "text.") + "layers"


def write_gptq_folder(folder: Path, source: Path, spec: ModelSpec, results: Packed, qconfig: dict,
                      shard_bytes: int = SHARD_BYTES) -> None:
    """Write the whole export (weights, configs, side files, vision tower folder) into ``folder``."""
    cfg = read_json(source / "config.json")
    write_weights(WeightFiles(source), spec.key_rules, results, folder, shard_bytes)
    copy_side_files(source, folder, keep_config=False)
    if spec.vision_dir is not None:  # legacy TinyLLaVA: the tower lives in its own checkpoint folder
        name = str(cfg.get("mm_vision_tower") or spec.vision_dir.name).rstrip("/").split("/")[-1]
        tower = folder / name
        tower.mkdir()
        write_weights(WeightFiles(spec.vision_dir), spec.vision_key_rules, results, tower, shard_bytes)
        copy_side_files(spec.vision_dir, tower, keep_config=True)
        cfg["mm_vision_tower"] = name  # found as a folder of that name inside the export
    cfg["quantization_config"] = qconfig
    for key in ("torch_dtype", "dtype"):  # transformers 4 / 5 spellings
        if key in cfg or key == "torch_dtype":
            cfg[key] = "float16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
