"""Loading GPTQ checkpoints: read the quantization settings and put a ``QuantLinear`` wherever the
checkpoint stores a quantized linear.

Works for any checkpoint in the standard GPTQ layout (docs/quant-formats.md §1), whoever wrote it: the settings
come from ``config.json["quantization_config"]`` (GPTQModel, optimum, transformers, edgelmm) or, failing
that, ``quantize_config.json`` (AutoGPTQ); the quantized modules are the ones with a ``<prefix>.qweight``
tensor, so an fp16 vision tower or lm_head simply stays ``nn.Linear``. ``g_idx`` is optional (absent means
``i // group_size``); scales may be fp16 or fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgelmm.checkpoint.gptq_format import CHECKPOINT_FORMATS, SUPPORTED_BITS, default_g_idx, unpack_qzeros
from edgelmm.checkpoint.json_file import read_json
from edgelmm.checkpoint.loader import WeightFiles, map_key
from edgelmm.errors import CheckpointError, UnsupportedModelError
from edgelmm.models.quant_linear import QuantLinear
from edgelmm.spec import KeyRules


@dataclass(frozen=True, slots=True)
class GPTQSettings:
    """What a reader needs to dequantize a GPTQ checkpoint."""

    bits: int
    group_size: int
    checkpoint_format: str  # "gptq" (v1: qzeros store zero - 1) or "gptq_v2"
    sym: bool | None = None  # symmetric (every zero 2^(bits-1)); None when the config does not say


def read_gptq_config(folder: Path, cfg: dict) -> GPTQSettings | None:
    """The GPTQ settings of a checkpoint folder, or None when it is not quantized.

    Raises UnsupportedModelError for another quantization method, a ``marlin`` (repacked) checkpoint, other
    bit widths, or per-module ``dynamic`` overrides of bits / group size."""
    qc = cfg.get("quantization_config")
    if qc is None and (Path(folder) / "quantize_config.json").is_file():
        qc = {"quant_method": "gptq", **read_json(Path(folder) / "quantize_config.json")}
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"quantization_config in {folder}/config.json is {qc!r}, not an object; the config is "
                              "damaged")
    method = qc.get("quant_method") or qc.get("method")
    if method != "gptq":
        raise UnsupportedModelError(f"{folder} is quantized with {method!r}; edgelmm loads GPTQ checkpoints "
                                    "(quant_method 'gptq') and unquantized ones")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if fmt not in CHECKPOINT_FORMATS or isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(f"GPTQ checkpoint_format {fmt!r} with {bits} bits is not supported; edgelmm "
                                    f"reads formats {CHECKPOINT_FORMATS} at {SUPPORTED_BITS} bits")
    if group_size != -1 and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise CheckpointError(f"GPTQ group_size {group_size!r} in {folder} is not a positive integer or -1; the "
                              "config is damaged")
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise CheckpointError(f"GPTQ 'dynamic' in {folder} is {dynamic!r}, not an object; the config is damaged")
    overrides = [k for k in dynamic if not k.startswith("-:")]
    if overrides:
        raise UnsupportedModelError(f"per-module GPTQ overrides ('dynamic': {overrides}) are not supported")
    sym = qc.get("sym")
    return GPTQSettings(bits, group_size, fmt, sym if isinstance(sym, bool) else None)


def check_quant_linears(model: nn.Module, settings: GPTQSettings) -> None:
    """CheckpointError naming the first loaded ``QuantLinear`` whose ``g_idx`` indexes a group it lacks, or,
    in a symmetric checkpoint, whose zero points are not ``2^(bits-1)`` (a v1 file labelled ``gptq_v2``
    reads every zero one too low, and the reverse one too high)."""
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        groups = layer.scales.shape[0]
        g_idx = layer.g_idx
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise CheckpointError(f"{name}.g_idx holds groups [{int(g_idx.min())}, {int(g_idx.max())}] but the "
                                  f"layer has {groups}; the checkpoint is damaged, download it again")
        if settings.sym:
            zeros = unpack_qzeros(layer.qzeros, settings.bits, settings.checkpoint_format)  # [G, N]
            want = 2 ** (settings.bits - 1)
            if bool((zeros != want).any()):
                found = sorted({int(z) for z in zeros.unique()[:4]})
                raise CheckpointError(
                    f"{name}.qzeros read as {found} under checkpoint_format {settings.checkpoint_format!r}, but a "
                    f"symmetric {settings.bits}-bit checkpoint's zeros are all {want}: the format label is wrong "
                    "(gptq stores zero - 1, gptq_v2 the zero itself) or the file is damaged")


def use_quant_linears(model: nn.Module, sources: list[tuple[WeightFiles, KeyRules]], settings: GPTQSettings,
                      device: torch.device) -> list[str]:
    """Replace, in a meta-device ``model``, each ``nn.Linear`` whose checkpoint holds ``<prefix>.qweight``
    by a meta-device ``QuantLinear`` (so the loader fills its buffers); return the replaced module names.

    When the checkpoint has no ``g_idx`` for a layer, the trivial one is created on ``device`` here."""
    replaced = []
    for files, rules in sources:
        keys = set(files.keys())
        for key in sorted(k for k in keys if k.endswith(".qweight")):
            name = map_key(key, rules)
            module_name = name[:-len(".qweight")] if name else ""
            try:
                linear = model.get_submodule(module_name)
            except AttributeError:
                continue  # a tensor edgelmm does not use (unused vision layers, stale copies)
            if not isinstance(linear, nn.Linear):
                raise CheckpointError(f"{key} quantizes {module_name}, which is not a linear layer")
            with torch.device("meta"):
                layer = QuantLinear(linear.in_features, linear.out_features, settings.bits, settings.group_size,
                                    settings.checkpoint_format, bias=linear.bias is not None)
            if key[:-len("qweight")] + "g_idx" not in keys:
                layer.g_idx = default_g_idx(linear.in_features, settings.group_size).to(device)
            parent, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
            replaced.append(module_name)
    return replaced
