"""Checkpoint reading: config.json, the shard index (never a glob), lazy per-tensor reads, key renames,
shape checks and dtype casts into a model built on the meta device."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from edgelmm.checkpoint.json_file import read_json
from edgelmm.checkpoint.safetensors_file import SafetensorsFile
from edgelmm.errors import CheckpointError, ShapeMismatchError
from edgelmm.spec import KeyRules


class WeightFiles:
    """The weight files a folder declares: ``model.safetensors.index.json``'s weight map when present,
    else ``model.safetensors``, else ``pytorch_model.bin``. Other files in the folder are never read
    (Intel/llava-gemma-2b keeps a stale second shard set beside the real one)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._open: dict[Path, object] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map; the file is damaged, download it again")
            self.file_of = {k: _shard_path(index, v) for k, v in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            self.file_of = self._all_keys(folder / "model.safetensors")
        elif (folder / "pytorch_model.bin").is_file():
            self.file_of = self._all_keys(folder / "pytorch_model.bin")
        else:
            raise CheckpointError(f"no model.safetensors(.index.json) or pytorch_model.bin in {folder}")
        for shard in sorted(set(self.file_of.values())):
            if not shard.is_file():
                raise CheckpointError(f"shard {shard.name} listed in the index is missing from {folder}; "
                                      "download it again")

    def _all_keys(self, path: Path) -> dict[str, Path]:
        return {k: path for k in self._handle(path).keys()}

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix != ".bin":
                self._open[path] = SafetensorsFile(path)
            else:
                try:
                    tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise CheckpointError(f"{path} is truncated, corrupt or not a plain tensor file ({reason}); "
                                          "download it again") from None
                if not isinstance(tensors, dict):
                    raise CheckpointError(f"{path} holds a {type(tensors).__name__}, not a table of tensors; "
                                          "download it again")
                self._open[path] = tensors
        return self._open[path]

    def keys(self):
        return self.file_of.keys()

    def release(self, path: Path) -> None:
        """Close ``path``; it is reopened if read again."""
        handle = self._open.pop(path, None)
        if isinstance(handle, SafetensorsFile):
            handle.close()

    def _tensor_of(self, key: str) -> torch.Tensor:
        """``key`` from a ``pytorch_model.bin`` (loaded whole, memory-mapped)."""
        handle = self._handle(self.file_of[key])
        value = handle.get(key) if isinstance(handle, dict) else None
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key} is listed for {self.file_of[key].name} but not in it as a tensor; "
                                  "download it again")
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self.file_of[key])
        return handle.shape(key) if isinstance(handle, SafetensorsFile) else tuple(self._tensor_of(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        handle = self._handle(self.file_of[key])
        return handle.dtype(key) if isinstance(handle, SafetensorsFile) else self._tensor_of(key).dtype

    def get(self, key: str) -> torch.Tensor:
        handle = self._handle(self.file_of[key])
        return handle.get(key) if isinstance(handle, SafetensorsFile) else self._tensor_of(key)


def _shard_path(index: Path, name) -> Path:
    """The shard ``name`` an index lists, which must be a plain file name inside the index's folder."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{index} lists the shard {name!r}, which is not a file inside its folder; "
                              "the index is damaged, download it again")
    return index.parent / name


def map_key(key: str, rules: KeyRules) -> str | None:
    """Rename a checkpoint key by the longest matching prefix rule; None when no rule matches."""
    best = max((r for r in rules if key.startswith(r[0])), key=lambda r: len(r[0]), default=None)
    return None if best is None else best[1] + key[len(best[0]):]


def load_into(model: nn.Module, sources: list[tuple[WeightFiles, KeyRules]], dtype: torch.dtype,
              device: torch.device) -> None:
    """Assign every parameter and persistent buffer still on the meta device (e.g. a QuantLinear's packed
    buffers) from the checkpoint(s); floating-point tensors are cast to ``dtype``, integer ones kept.
    Checkpoint tensors the model does not use (unused vision layers, pooling heads) are never read.
    Raises ShapeMismatchError on a wrong shape and CheckpointError on a missing tensor."""
    params = {name: t for name, t in model.state_dict(keep_vars=True).items() if t.is_meta}
    loaded: set[str] = set()
    for files, rules in sources:
        previous = None
        for key in sorted(files.keys(), key=lambda k: str(files.file_of[k])):  # one shard at a time
            if previous is not None and files.file_of[key] != previous:
                files.release(previous)  # unmap a finished shard: its pages no longer count towards RSS
            previous = files.file_of[key]
            name = map_key(key, rules)
            if name not in params or name in loaded:
                continue
            want = tuple(params[name].shape)
            if files.shape(key) != want:
                raise ShapeMismatchError(
                    f"{key} in {files.file_of[key].name} has shape {files.shape(key)}, but config.json implies "
                    f"{want}; the config and the weights belong to different models")
            tensor = files.get(key)
            if params[name].is_floating_point() != tensor.is_floating_point():
                kind = "a floating-point" if params[name].is_floating_point() else "an integer"
                raise CheckpointError(f"{key} in {files.file_of[key].name} is stored as {tensor.dtype}, but it is "
                                      f"{kind} tensor; the file is damaged, download it again")
            _assign(model, name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None))
            loaded.add(name)
        if previous is not None:
            files.release(previous)
    text = getattr(model, "text", model)
    if "text.lm_head.weight" not in loaded and text.cfg.tie_word_embeddings:
        text.lm_head.weight = text.embed_tokens.weight
        loaded.add("text.lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
                              "a shard may be missing or the folder belongs to another model")


def check_layer_count(prefix: str, sources: list[tuple[WeightFiles, KeyRules]], fewest: int,
                      most: int | None) -> None:
    """CheckpointError unless the checkpoint's layers under ``prefix`` (edgelmm names, e.g. ``"text.layers."``)
    number from ``fewest`` (the layers the model builds) to ``most`` (the config's layer count; None: no
    limit). Checked before the model is built: layers beyond the config's count would be dropped without a
    word (or, in a vision tower, shift the feature layer), and layers it invents would be built, at any
    count, only to be reported missing."""
    found = set()
    for files, rules in sources:
        for key in files.file_of:
            name = map_key(key, rules) or ""
            index = name[len(prefix):].split(".")[0] if name.startswith(prefix) else ""
            if index.isdigit():
                found.add(int(index))
    stored = max(found) + 1 if found else 0
    if stored < fewest or (most is not None and stored > most):
        kind = "decoder" if prefix.startswith("text.") else "vision tower"
        too_many = most is not None and stored > most
        count = f"says {most}" if too_many else f"needs {fewest}"
        raise CheckpointError(f"the config {count} {kind} layers but the checkpoint holds {stored}; the config "
                              "and the weights belong to different models")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    is_param = isinstance(getattr(module, attr), nn.Parameter)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False) if is_param else tensor)
