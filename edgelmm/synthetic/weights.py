"""Random weights written as a checkpoint's safetensors shards, shared by every synthetic replica."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

QK_SHARPEN = 3.0  # scales q/k init: peaked attention keeps token positions (and a mirrored image) visible


def save_sharded(state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype, shards: int = 2) -> None:
    """Write ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``. A value may
    be a callable returning the tensor: it is made when its shard is written (one shard in memory)."""
    keys = sorted(state)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: (state[k]() if callable(state[k]) else state[k]).to(dtype).contiguous() for k in keys[i::shards]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
