"""``edgelmm make-tiny tinygpt-v OUT``: a tiny random-weight TinyGPT-V in the released layouts (docs/model-formats.md
§3.1), plus the description file that names the pieces:

- ``TinyGPT-V_for_Stage{N}.pth``: a training-runner save (``model``, ``optimizer``, ``config``, ``scaler``,
  ``epoch``); ``model`` holds llama_proj(2), the trainable norm weights and, with LoRA, A/B for
  ``query_key_value``/``dense`` under the PEFT prefix ``llama_model.base_model.model.``;
- ``phi-2/``: transformers-4.36 Phi-2 (fused ``query_key_value`` interleaved per head, no QK/post norms,
  stale ``input_layernorm`` weights the stage checkpoint overrides), sharded safetensors, Phi-2 tokenizer
  (``fused=False``: q/k/v apart, as transformers >= 4.37 saves Phi-2);
- ``eva_vit_g.pth``: EVA state dict with one block more than used and positions for 224x224 inputs;
- ``blip2_pretrained_flant5xxl.pth`` (Q-Former, ``query_tokens``, ``ln_vision`` and unused tensors) and
  ``bert-base-uncased/config.json``; ``tinygpt-v.json``.

``full=True`` writes the released sizes instead (EVA ViT-g/14, BERT-base Q-Former, Phi-2 2.7B, LoRA r=64),
for benchmarks: weights made on demand per tensor in fp16 (about 8 GB in memory), the tokenizer stays tiny."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edgelmm.checkpoint.staging import staging
from edgelmm.config import EvaConfig, EvaQFormerConfig, QFormerConfig, TextConfig
from edgelmm.errors import ConfigError
from edgelmm.families.tinygptv import tinygptv_spec
from edgelmm.models.tinygptv import TinyGPTV
from edgelmm.synthetic.shapes import FULL
from edgelmm.synthetic.tokenizers import write_tiny_tokenizer
from edgelmm.synthetic.weights import QK_SHARPEN, save_sharded

EVA = {"width": 32, "depth": 2, "heads": 2, "patch_size": 14}
PHI2 = {"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "partial_rotary_factor": 0.4,
        "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "qk_layernorm": False, "resid_pdrop": 0.1, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "rope_scaling": None, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": "float16", "transformers_version": "4.36.2"}  # microsoft/phi-2's fields, tiny sizes
BERT = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "vocab_size": 100, "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "pad_token_id": 0,
        "position_embedding_type": "absolute"}
PROJ_DIM, LORA_R, LORA_ALPHA, QUERIES = 48, 8, 16, 32
PEFT = "llama_model.base_model.model."
FULL_BERT = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "vocab_size": 30522, "max_position_embeddings": 512}
FULL_PROJ_DIM, FULL_LORA_R = 4096, 64


@dataclass(frozen=True)
class Sizes:
    """The replica's sizes and the dtype its weights are made in."""

    eva: dict
    phi2: dict
    bert: dict
    proj_dim: int
    lora_r: int
    dtype: torch.dtype

    @classmethod
    def pick(cls, full: bool) -> Sizes:
        if full:
            return cls({}, FULL["phi"], {**BERT, **FULL_BERT}, FULL_PROJ_DIM, FULL_LORA_R, torch.float16)
        return cls(EVA, {}, BERT, PROJ_DIM, LORA_R, torch.float32)


def make_tiny_tinygptv(out: str | Path, seed: int = 0, stage: int = 3, lora: bool = True,
                       fused: bool = True, full: bool = False) -> Path:
    """Write the tiny replica to the new folder ``out`` (whole, then renamed); returns its description file.
    ``stage`` 4 means a 448x448 stage-4 checkpoint; ``lora=False`` a LoRA-free (stage-1 style) checkpoint;
    ``fused=False`` a Phi-2 folder as transformers >= 4.37 saves it (q/k/v apart); ``full`` the released sizes."""
    if stage not in (1, 2, 3, 4):
        raise ConfigError(f"stage must be 1-4, got {stage!r}")
    with staging(out) as tmp:
        _write(tmp, seed, stage, lora, fused, Sizes.pick(full))
    return Path(out).expanduser() / "tinygpt-v.json"


def _random_state(model: TinyGPTV, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Values for ``model``'s parameters (it may live on the meta device), made one at a time in ``dtype``:
    norm gains near 1, small biases, fan-in-scaled weights (q/k sharpened), so the output follows the input."""
    state = {}
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if ("norm" in name.lower() or name.startswith("ln_vision")) and name.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(("q_layernorm.bias", "k_layernorm.bias")):
            value = torch.zeros(p.shape)  # no released file carries these: they keep their fresh value
        elif p.ndim == 1 or name.endswith(("_bias", "query_tokens", "cls_token", "pos_embed")):
            value = (1.0 if name.endswith("query_tokens") else 0.1) * noise
        elif name == "text.embed_tokens.weight":
            value = noise
        else:
            sharpen = QK_SHARPEN if name.endswith(("q_proj.weight", "k_proj.weight", "self.query.weight",
                                                   "self.key.weight")) else 1.0
            value = sharpen * noise / p[0].numel() ** 0.5
        state[name] = value.to(dtype)
    return state


def _renamed(state: dict, prefix: str, new: str) -> dict[str, torch.Tensor]:
    return {new + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _phi_files(state: dict, text: TextConfig, fused: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Phi-2 in the 4.36 layout: q/k/v fused as the 4.36 converter does (Microsoft's [3, heads, head_dim]
    row order, first two axes swapped); no QK or post norms; stale input_layernorm gains."""
    files = _renamed(state, "text.lm_head.", "lm_head.")
    for name, t in _renamed(state, "text.", "model.").items():
        if name.startswith("model.lm_head.") or any(n in name for n in ("q_layernorm", "k_layernorm",
                                                                          "post_layernorm")):
            continue
        if fused and (".k_proj." in name or ".v_proj." in name):
            continue
        if fused and ".q_proj." in name:
            ours = "text." + name[len("model."):]
            parts = [state[ours.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            wqkv = torch.cat(parts)  # (3*D[, D]): Microsoft's Wqkv, rows [3, heads, head_dim]
            rest = wqkv.shape[1:]
            qkv = wqkv.view(3, text.num_heads, text.head_dim, *rest).transpose(0, 1).reshape(-1, *rest)
            files[name.replace("q_proj", "query_key_value")] = qkv  # rows [heads, 3, head_dim]
            continue
        if name.endswith("input_layernorm.weight"):  # the stage checkpoint holds the trained gains
            t = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        files[name] = t
    return files


def _stage_model(state: dict, text: TextConfig, lora: bool, rank: int,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The trainable tensors a stage checkpoint saves: projections, norm gains and (with LoRA) A/B."""
    model = _renamed(state, "llama_proj.", "llama_proj.") | _renamed(state, "llama_proj2.", "llama_proj2.")
    prefix = PEFT + "model." if lora else "llama_model.model."
    for name, t in _renamed(state, "text.", prefix).items():
        if name.endswith(("q_layernorm.weight", "k_layernorm.weight", "post_layernorm.weight",
                          "input_layernorm.weight")) or (not lora and name.endswith("final_layernorm.weight")):
            model[name] = t
    if lora:
        d = text.hidden_size
        for i in range(text.num_layers):
            for target, out_dim in (("query_key_value", 3 * d), ("dense", d)):
                key = f"{PEFT}model.layers.{i}.self_attn.{target}"
                model[key + ".lora_A.weight"] = torch.randn(rank, d, generator=gen) / d ** 0.5
                model[key + ".lora_B.weight"] = 0.5 * torch.randn(out_dim, rank, generator=gen) / rank ** 0.5
    return model


def _write(folder: Path, seed: int, stage: int, lora: bool, fused: bool, sizes: Sizes) -> None:
    size = 448 if stage == 4 else 224
    phi_dir, bert_dir = folder / "phi-2", folder / "bert-base-uncased"
    ids = write_tiny_tokenizer("phi2", phi_dir)
    vocab = -(-ids["vocab_size"] // 64) * 64
    phi_cfg = {**PHI2, "vocab_size": vocab, **sizes.phi2, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}
    (phi_dir / "config.json").write_text(json.dumps(phi_cfg, indent=2))
    bert_dir.mkdir()
    (bert_dir / "config.json").write_text(json.dumps(sizes.bert, indent=2))
    text = TextConfig.from_hf(phi_cfg, "phi")
    text.qk_layernorm = text.post_attention_rmsnorm = True
    eva = EvaConfig(**sizes.eva, image_size=size)
    visual = EvaQFormerConfig(eva, QFormerConfig.from_bert(sizes.bert, eva.width, QUERIES), sizes.proj_dim)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = TinyGPTV(tinygptv_spec(text, visual))
    state = _random_state(model, gen, sizes.dtype)
    del model

    save_sharded(_phi_files(state, text, fused, gen), phi_dir, torch.float16)
    eva_state = _renamed(state, "vision.", "")
    pos_embed = 0.1 * torch.randn(1, (224 // eva.patch_size) ** 2 + 1, eva.width, generator=gen)
    eva_state["pos_embed"] = pos_embed.to(sizes.dtype)
    torch.save(eva_state | _unused_block(eva_state, eva.depth, gen), folder / "eva_vit_g.pth")
    blip2 = (_renamed(state, "qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
             | _renamed(state, "qformer.layer.", "Qformer.bert.encoder.layer.")
             | _renamed(state, "ln_vision.", "ln_vision."))
    blip2["query_tokens"] = state["qformer.query_tokens"]
    hidden = sizes.bert["hidden_size"]  # tensors of the BLIP-2 file MiniGPT-4 never uses:
    words = torch.randn(sizes.bert["vocab_size"], hidden, generator=gen).to(sizes.dtype)
    blip2.update({"Qformer.bert.embeddings.word_embeddings.weight": words,
                  "Qformer.bert.embeddings.position_ids": torch.arange(sizes.bert["max_position_embeddings"])[None],
                  "t5_proj.weight": torch.randn(16, hidden, generator=gen), "t5_proj.bias": torch.zeros(16)})
    torch.save({"model": blip2}, folder / "blip2_pretrained_flant5xxl.pth")

    arch = {"arch": "minigpt_v2", "model_type": "pretrain"} if stage == 4 else \
        {"arch": "minigpt4", "model_type": "pretrain_vicuna0"}
    config = {"model": {**arch, "image_size": size, "num_query_token": QUERIES, "lora_r": sizes.lora_r if lora else 0,
                        "lora_alpha": LORA_ALPHA, "llama_model": "/root/phi-2", "freeze_vit": True},
              "run": {"task": "image_text_pretrain", "amp": True}}
    ckpt = {"model": _stage_model(state, text, lora, sizes.lora_r, gen), "optimizer": {"state": {}, "param_groups": []},
            "config": config, "scaler": None, "epoch": 4}
    name = f"TinyGPT-V_for_Stage{stage}.pth"
    torch.save(ckpt, folder / name)
    description = {"format": "tinygpt-v", "stage": stage, "checkpoint": name, "phi2": "phi-2",
                   "eva_vit": "eva_vit_g.pth", "qformer": "blip2_pretrained_flant5xxl.pth",
                   "qformer_config": "bert-base-uncased", "vision": sizes.eva}
    (folder / "tinygpt-v.json").write_text(json.dumps(description, indent=2))


def _unused_block(eva_state: dict, index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors for block ``index``, shaped like block 0: the file has one block more than LAVIS builds."""
    return {k.replace("blocks.0.", f"blocks.{index}."): torch.randn(v.shape, generator=gen).to(v.dtype)
            for k, v in eva_state.items() if k.startswith("blocks.0.")}
