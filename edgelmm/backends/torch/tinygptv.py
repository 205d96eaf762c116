"""TinyGPT-V on the torch backend: its released pieces (named by a description file, see
``edgelmm.families.tinygptv``) read into one tensor table, LoRA merged, and loaded into ``TinyGPTV``."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgelmm.backends.torch.backend import TorchBackend, check_budget, resolve_device
from edgelmm.backends.torch.bnb import check_method, use_bnb_linears
from edgelmm.checkpoint.loader import WeightFiles, load_into
from edgelmm.checkpoint.tinygptv_pieces import (
    EVA_RULES,
    PHI_RULES,
    QFORMER_RULES,
    STAGE_RULES,
    TensorTable,
    add_files,
    add_tensors,
    fill_fresh,
    fuse_qkv,
    merge_lora,
    read_pth,
    resize_pos_embed,
    split_qkv,
    state_dict,
    take_lora,
)
from edgelmm.config import EvaQFormerConfig, QFormerConfig, TextConfig
from edgelmm.errors import CheckpointError, ConfigError, ShapeMismatchError
from edgelmm.families.tinygptv import Description, bert_config, text_config, tinygptv_spec, trained_image_size
from edgelmm.models.tinygptv import TinyGPTV
from edgelmm.processing.tokenizer import Tokenizer

_SOURCE_OF = (("vision.", "eva_vit"), ("ln_vision.", "qformer"), ("qformer.", "qformer"),
              ("llama_proj", "checkpoint"), ("text.", "phi2"))  # which piece must supply each parameter


def _lora_alpha(desc: Description, checkpoint: dict) -> float:
    saved = ((checkpoint.get("config") or {}).get("model") or {}).get("lora_alpha")
    return float(desc.lora_alpha if desc.lora_alpha is not None else saved if saved is not None else 16)


def build_table(desc: Description, text: TextConfig) -> TensorTable:
    """Every tensor TinyGPT-V needs, renamed and transformed, in upstream load order (Phi-2, EVA, BLIP-2,
    stage checkpoint: later files win)."""
    checkpoint = read_pth(desc.pieces["checkpoint"], "stage checkpoint")
    trained = trained_image_size(checkpoint)
    if trained is not None and trained != desc.eva.image_size:
        raise ConfigError(f"{desc.pieces['checkpoint'].name} was trained on {trained}x{trained} images (stage 4: "
                          f"448, stages 1-3: 224) but {desc.path.name} says stage {desc.stage}; fix \"stage\"")
    table = TensorTable()
    add_files(table, WeightFiles(desc.pieces["phi2"]), PHI_RULES)
    fuse_qkv(table, text.num_heads)  # a Phi-2 saved by transformers >= 4.37
    for key, rules in (("eva_vit", EVA_RULES), ("qformer", QFORMER_RULES), ("checkpoint", STAGE_RULES)):
        obj = checkpoint if key == "checkpoint" else read_pth(desc.pieces[key], key)
        add_tensors(table, state_dict(obj, desc.pieces[key], key), rules, desc.pieces[key])
    merge_lora(table, take_lora(table), _lora_alpha(desc, checkpoint), desc.lora_r)
    split_qkv(table, text.num_heads)
    resize_pos_embed(table, desc.eva.grid)
    return table


def _require(table: TensorTable, name: str, desc: Description, piece: str) -> tuple[int, ...]:
    if name not in table:
        raise CheckpointError(f"{desc.pieces[piece]} has no {name.removeprefix('qformer.')}; is it the right file?")
    return table.shape(name)


def _check(table: TensorTable, params: dict[str, nn.Parameter], desc: Description) -> None:
    """Every parameter present with its shape, else a typed error naming the piece at fault."""
    missing: dict[str, list[str]] = {}
    for name, p in params.items():
        if name not in table:
            piece = next(piece for prefix, piece in _SOURCE_OF if name.startswith(prefix))
            missing.setdefault(piece, []).append(name)
        elif table.shape(name) != tuple(p.shape):
            raise ShapeMismatchError(
                f"{name} from {table.file_of[name].name} has shape {table.shape(name)} but the other pieces imply "
                f"{tuple(p.shape)}; the pieces belong to different models (or {desc.path.name}'s sizes are wrong)")
    if missing:
        piece, names = next(iter(missing.items()))
        raise CheckpointError(f"{desc.pieces[piece]} lacks {len(names)} tensors TinyGPT-V needs, e.g. {names[:3]}; "
                              "is it the right file, complete?")


def load_tinygptv(path: Path, device=None, dtype=None, context_length: int | None = None, max_memory=None,
                  quantize: str | None = None, quantize_vision: bool = False):
    """Build TinyGPT-V from the description file ``path``; returns (TorchBackend, Tokenizer, path), the
    arguments of ``EdgeLMM``. LoRA is merged into the base weights here, once. ``max_memory`` and ``quantize``
    as in ``EdgeLMM.load``: the budget is checked before the weights are loaded, and the Phi-2 linears are
    quantized as the merged weights arrive (EVA + Q-Former stay in ``dtype``)."""
    device, dtype = resolve_device(device, dtype)
    if quantize is not None:
        check_method(quantize)
    if quantize_vision:
        raise ConfigError("TinyGPT-V's EVA + Q-Former are not quantized (its EVA attention reads its fused qkv "
                          "weight directly); drop quantize_vision")
    desc = Description.read(path)
    text = text_config(desc)
    table = build_table(desc, text)
    text.vocab_size = _require(table, "text.embed_tokens.weight", desc, "phi2")[0]
    queries = _require(table, "qformer.query_tokens", desc, "qformer")[1]
    proj_dim = _require(table, "llama_proj.weight", desc, "checkpoint")[0]
    qformer = QFormerConfig.from_bert(bert_config(desc.pieces["qformer_config"]), desc.eva.width, queries)
    spec = tinygptv_spec(text, EvaQFormerConfig(desc.eva, qformer, proj_dim), desc.context_length)
    with torch.device("meta"):
        model = TinyGPTV(spec)
    if max_memory is not None:  # before any weight is loaded into the model
        check_budget(model, spec, dtype, context_length, max_memory,
                     export=f"its 4-bit ONNX export (edgelmm export {path.name} --format onnx --bits 4)", bnb=quantize)
    params = dict(model.named_parameters())
    fill_fresh(table, params, desc.pieces["phi2"])
    _check(table, params, desc)
    if quantize is not None:
        use_bnb_linears(model, quantize, dtype, device)
    ln_vision = {name: table.get(f"ln_vision.{name}").float().to(device) for name in ("weight", "bias")}
    load_into(model, [(table, (("", ""),))], dtype, device)  # empties the table file by file
    for name, value in ln_vision.items():  # ln_vision stays fp32, as LAVIS keeps it
        setattr(model.ln_vision, name, nn.Parameter(value, False))
    return TorchBackend.ready(model, context_length, dtype, device), Tokenizer.from_dir(desc.pieces["phi2"]), path
