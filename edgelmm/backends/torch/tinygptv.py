"""TinyGPT-V from its released pieces, named by a small JSON description file (model-formats.md §3).

TinyGPT-V ships no config.json: a stage checkpoint holds only the trained tensors, and the rest comes from
three external bases. The description file names them; relative paths are read from the file's folder::

    {
      "format": "tinygpt-v",
      "stage": 3,
      "checkpoint": "TinyGPT-V_for_Stage3.pth",
      "phi2": "phi-2",
      "eva_vit": "eva_vit_g.pth",
      "qformer": "blip2_pretrained_flant5xxl.pth",
      "qformer_config": "bert-base-uncased"
    }

- ``format``: must be ``"tinygpt-v"``.
- ``stage``: 1-4. Stages 1-3 run at 224x224, stage 4 at 448x448.
- ``checkpoint``: ``TinyGPT-V_for_Stage{1..4}.pth`` (its ``model`` dict: llama_proj(2), norm weights, LoRA A/B).
- ``phi2``: the Phi-2 folder in the transformers-4.36 layout (fused ``query_key_value``; a folder saved by
  transformers >= 4.37, with q/k/v apart, works too), with its tokenizer.
- ``eva_vit``: LAVIS ``eva_vit_g.pth``.
- ``qformer``: the BLIP-2 checkpoint with ``Qformer.*``, ``query_tokens`` and ``ln_vision``.
- ``qformer_config``: bert-base-uncased's ``config.json``, or the folder holding it.
- Optional: ``image_size`` (must agree with ``stage``); ``lora_alpha`` (default: the checkpoint's saved
  config, else 16; the rank comes from the LoRA tensors, and ``lora_r``, if given, is checked against it);
  ``vision`` (EVA sizes ``width``/``depth``/``heads``/``patch_size``, default ViT-g/14: 1408/39/16/14);
  ``context_length`` (KV cache length, default 2048).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgelmm.config import TextConfig
from edgelmm.errors import CheckpointError, ConfigError, ShapeMismatchError, UnsupportedModelError
from edgelmm.processing.image import CLIP_MEAN, CLIP_STD, ImageSpec
from edgelmm.checkpoint.loader import WeightFiles, load_into, read_json
from edgelmm.models.tinygptv import TinyGPTV
from edgelmm.families.tinygptv import EvaConfig, QFormerConfig, TinyGPTVSpec, VisualConfig
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
from edgelmm.processing.tokenizer import Tokenizer

MARKER = "tinygpt-v"
PIECES = ("checkpoint", "phi2", "eva_vit", "qformer", "qformer_config")
_SOURCE_OF = (("vision.", "eva_vit"), ("ln_vision.", "qformer"), ("qformer.", "qformer"),
              ("llama_proj", "checkpoint"), ("text.", "phi2"))  # which piece must supply each parameter


@dataclass(slots=True)
class Description:
    """A parsed description file: the stage, its input size, and where each released piece is."""

    path: Path
    stage: int
    eva: EvaConfig
    pieces: dict[str, Path]
    lora_alpha: float | None = None
    lora_r: int | None = None
    context_length: int = 2048

    @classmethod
    def read(cls, path: Path) -> Description:
        cfg = read_json(path)
        if not isinstance(cfg, dict) or cfg.get("format") != MARKER:
            raise UnsupportedModelError(f"{path} is not a model description edgelmm knows; a TinyGPT-V description "
                                        f'has "format": "{MARKER}" (see edgelmm/tinygptv.py)')
        stage = cfg.get("stage")
        if stage not in (1, 2, 3, 4):
            raise ConfigError(f'{path}: "stage" must be 1, 2, 3 or 4 (the TinyGPT-V_for_StageN.pth you use)')
        size = 448 if stage == 4 else 224
        if cfg.get("image_size", size) != size:
            raise ConfigError(f"{path}: stage {stage} runs at {size}x{size} (stages 1-3: 224, stage 4: 448), "
                              f"not {cfg['image_size']}; fix image_size or stage")
        pieces = {}
        for key in PIECES:
            if not isinstance(cfg.get(key), str):
                raise ConfigError(f'{path} lacks "{key}" (the path of a released TinyGPT-V piece)')
            pieces[key] = (path.parent / Path(cfg[key]).expanduser()).resolve()
        vision = cfg.get("vision", {})
        unknown = set(vision) - {"width", "depth", "heads", "patch_size"}
        if unknown:
            raise ConfigError(f'{path}: unknown "vision" keys {sorted(unknown)}; use width, depth, heads, patch_size')
        return cls(path, stage, EvaConfig(**vision, image_size=size), pieces, cfg.get("lora_alpha"),
                   cfg.get("lora_r"), cfg.get("context_length", 2048))


def trained_image_size(checkpoint: dict) -> int | None:
    """The input size a training-runner save was trained at, from its saved config (None if absent)."""
    model = (checkpoint.get("config") or {}).get("model") or {}
    if "image_size" in model:
        return int(model["image_size"])
    return {"minigpt_v2": 448, "minigpt4": 224}.get(model.get("arch"))


def bert_config(path: Path) -> dict:
    """The Q-Former's BERT config.json (``path`` is the file or its folder)."""
    return read_json(path / "config.json" if path.is_dir() else path)


def projection_dim(desc: Description) -> int:
    """``llama_proj``'s output width (4096 upstream), read from the stage checkpoint's tensor shapes."""
    tensors = state_dict(read_pth(desc.pieces["checkpoint"], "stage checkpoint"), desc.pieces["checkpoint"],
                         "stage checkpoint")
    weight = next((v for k, v in tensors.items() if k.endswith("llama_proj.weight")), None)
    if weight is None:
        raise CheckpointError(f"{desc.pieces['checkpoint']} has no llama_proj.weight; is it a TinyGPT-V stage "
                              "checkpoint?")
    return weight.shape[0]


def text_config(desc: Description) -> TextConfig:
    """The modified Phi-2's config, from the Phi-2 folder's config.json."""
    folder = desc.pieces["phi2"]
    if not folder.is_dir():
        raise CheckpointError(f"Phi-2 folder {folder} not found; point \"phi2\" at the transformers-4.36 Phi-2 folder")
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") != "phi":
        raise UnsupportedModelError(f"{folder} holds a {cfg.get('model_type')!r} model; TinyGPT-V needs Phi-2")
    text = TextConfig.from_hf(cfg, "phi")
    text.qk_layernorm = text.post_attention_rmsnorm = True  # TinyGPT-V's modeling_phi.py, always on
    return text


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


def load_tinygptv(path: Path, device=None, dtype=None, context_length: int | None = None, max_memory=None):
    """Build TinyGPT-V from the description file ``path``; returns (TorchBackend, Tokenizer, path), the
    arguments of ``EdgeLMM``. LoRA is merged into the base weights here, once. ``max_memory`` as in
    ``EdgeLMM.load``: checked against the plan before the weights are loaded."""
    from edgelmm.backends.torch.backend import TorchBackend, check_budget, new_cache, resolve_dtype
    from edgelmm.models.layers import bind_kernels

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    desc = Description.read(path)
    text = text_config(desc)
    table = build_table(desc, text)
    text.vocab_size = _require(table, "text.embed_tokens.weight", desc, "phi2")[0]
    queries = _require(table, "qformer.query_tokens", desc, "qformer")[1]
    proj_dim = _require(table, "llama_proj.weight", desc, "checkpoint")[0]
    qformer = QFormerConfig.from_bert(bert_config(desc.pieces["qformer_config"]), desc.eva.width, queries)
    visual = VisualConfig(desc.eva, qformer, proj_dim)
    with torch.device("meta"):
        model = TinyGPTV(visual, text)
    model.spec = TinyGPTVSpec(text, visual, ImageSpec(desc.eva.image_size, "square", CLIP_MEAN, CLIP_STD),
                              desc.context_length)
    if max_memory is not None:  # before any weight is loaded into the model
        check_budget(model, model.spec, dtype, context_length, max_memory,
                     export=f"its 4-bit ONNX export (edgelmm export {path.name} --format onnx --bits 4)")
    params = dict(model.named_parameters())
    fill_fresh(table, params, desc.pieces["phi2"])
    _check(table, params, desc)
    ln_vision = {name: table.get(f"ln_vision.{name}").float().to(device) for name in ("weight", "bias")}
    load_into(model, [(table, (("", ""),))], dtype, device)  # empties the table file by file
    for name, value in ln_vision.items():  # ln_vision stays fp32, as LAVIS keeps it
        setattr(model.ln_vision, name, nn.Parameter(value, False))
    model.text.init_rope(device)
    bind_kernels(model, device)
    model.eval()
    backend = TorchBackend(model, new_cache(model.spec, context_length, dtype, device))
    return backend, Tokenizer.from_dir(desc.pieces["phi2"]), path
