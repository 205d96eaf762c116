"""``edgelmm make-tiny``: tiny random-weight checkpoints in each family's real on-disk layout (config.json
fields, key names, shard index, dtype, tokenizer files, and the quirks: stale duplicate shards, a separate
vision tower folder, unused vision layers and pooling heads)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgelmm.checkpoint.staging import staging
from edgelmm.errors import ConfigError
from edgelmm.families import detect
from edgelmm.models.vlm import VLM
from edgelmm.synthetic.shapes import CLIP_PROCESSOR, FACTORY_LLMS, SIGLIP_PROCESSOR, TINY, checkpoint_config
from edgelmm.synthetic.tokenizers import write_tiny_tokenizer
from edgelmm.synthetic.weights import QK_SHARPEN, save_sharded

# Replicas are named after the released checkpoints they copy; each is a checkpoint of one family (ModelSpec.family)
REPLICA_FAMILY = {"tinyllava": "tinyllava", "tinyllava-legacy": "tinyllava-legacy", "llava-gemma": "llava-hf",
                  "tiny-llava-hf": "llava-hf", "mipha": "mipha"}
REPLICAS = tuple(REPLICA_FAMILY)
TOKENIZER_STYLE = {"tinyllava": "phi2", "tinyllava-legacy": "phi2", "mipha": "phi2",
                   "llava-gemma": "gemma", "tiny-llava-hf": "llama"}
DTYPE = {"tinyllava": torch.float16, "tinyllava-legacy": torch.float32, "mipha": torch.bfloat16,
         "llava-gemma": torch.float32, "tiny-llava-hf": torch.float32}

def _randomize(model: VLM, seed: int) -> None:
    """Random weights with norm gains near 1 (Gemma's (1+w) norms near 0) and peaked attention, so tiny
    models stay sensitive to their input (image content and layout) instead of collapsing onto one token."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.data = _random_tensor(model, name, p.shape, gen, torch.float32)


def _random_tensor(model: VLM, name: str, shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """One parameter's random init (see ``_randomize``), generated directly in ``dtype``."""
    gemma = model.spec.text.arch == "gemma"
    noise = torch.randn(shape, generator=gen, dtype=dtype)
    if "norm" in name and name.endswith("weight"):
        return (0.0 if gemma and name.startswith("text.") else 1.0) + 0.1 * noise
    if len(shape) == 1:
        return 0.1 * noise
    if name == "text.embed_tokens.weight":  # Gemma scales embeddings by sqrt(d) at run time
        return 0.25 * noise / model.spec.text.hidden_size ** 0.5 if gemma else noise
    sharpen = QK_SHARPEN if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
    return sharpen * noise / math.prod(shape[1:]) ** 0.5


def _lazy_random_state(model: VLM, seed: int, dtype: torch.dtype) -> dict:
    """Like ``_randomize`` on a meta-device model, but each value is a callable making its tensor (own
    generator per tensor), so a full-size model is generated one shard at a time by ``save_sharded``."""
    def make(i: int, name: str, shape):
        return lambda: _random_tensor(model, name, shape, torch.Generator().manual_seed(seed * 100_003 + i), dtype)

    return {name: make(i, name, tuple(p.shape)) for i, (name, p) in enumerate(model.named_parameters())}


def _extra_vision(cfg: dict, prefix: str, used: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The tower tensors edgelmm never reads: layers after the feature layer, post_layernorm, SigLIP's head."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {}
    for i in range(used, cfg["num_hidden_layers"]):
        lp = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{lp}self_attn.{proj}.weight"], shapes[f"{lp}self_attn.{proj}.bias"] = (d, d), (d,)
        shapes.update({f"{lp}mlp.fc1.weight": (f, d), f"{lp}mlp.fc1.bias": (f,), f"{lp}mlp.fc2.weight": (d, f),
                       f"{lp}mlp.fc2.bias": (d,), f"{lp}layer_norm1.weight": (d,), f"{lp}layer_norm1.bias": (d,),
                       f"{lp}layer_norm2.weight": (d,), f"{lp}layer_norm2.bias": (d,)})
    shapes.update({f"{prefix}post_layernorm.weight": (d,), f"{prefix}post_layernorm.bias": (d,)})
    if cfg["model_type"].startswith("siglip"):
        shapes.update({f"{prefix}head.probe": (1, 1, d), f"{prefix}head.attention.in_proj_weight": (3 * d, d),
                       f"{prefix}head.attention.in_proj_bias": (3 * d,), f"{prefix}head.attention.out_proj.weight":
                       (d, d), f"{prefix}head.attention.out_proj.bias": (d,), f"{prefix}head.layernorm.weight": (d,),
                       f"{prefix}head.layernorm.bias": (d,), f"{prefix}head.mlp.fc1.weight": (f, d),
                       f"{prefix}head.mlp.fc1.bias": (f,), f"{prefix}head.mlp.fc2.weight": (d, f),
                       f"{prefix}head.mlp.fc2.bias": (d,)})
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def _to_checkpoint(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    inverse = sorted(((ours, ckpt) for ckpt, ours in rules), key=lambda r: -len(r[0]))
    out = {}
    for name, tensor in state.items():
        ours, ckpt = next(r for r in inverse if name.startswith(r[0]))
        out[ckpt + name[len(ours):]] = tensor
    return out


def make_tiny(family: str, out: str | Path, seed: int = 0, layout: str = "old", llm: str = "phi",
              sizes: dict = TINY, vocab: int | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` to ``out`` (written whole, then renamed).
    ``layout`` picks HF Llava's old or new key layout; ``llm`` the TinyLLaVA Factory language model.
    ``sizes=shapes.FULL`` with a ``vocab`` and a ``dtype`` writes the released model's size instead (weights
    generated per tensor in ``dtype``, one ~2 GB shard in memory at a time; the tokenizer stays tiny)."""
    if family == "tinygpt-v":  # released pieces plus a description file; returns that file's path
        from edgelmm.synthetic.tinygptv import make_tiny_tinygptv
        return make_tiny_tinygptv(out, seed)
    if family not in REPLICAS:
        raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(REPLICAS)}")
    if llm != "phi" and family != "tinyllava" or llm not in FACTORY_LLMS:
        raise ConfigError(f"--llm {llm} applies to the tinyllava family only, with one of {sorted(FACTORY_LLMS)}")
    with staging(out) as tmp:
        _write(family, tmp, seed, layout, llm, sizes, vocab, dtype)
    return Path(out).expanduser()


def _write(family: str, folder: Path, seed: int, layout: str, llm: str, sizes: dict = TINY, vocab: int | None = None,
           dtype: torch.dtype | None = None) -> None:
    if family == "tinyllava":  # sentinel splicing: no <image> token in the vocabulary
        ids = write_tiny_tokenizer(FACTORY_LLMS[llm][1], folder, image_token=False, pad_token=False)
    else:
        ids = write_tiny_tokenizer(TOKENIZER_STYLE[family], folder)
    vocab = vocab or -(-ids["vocab_size"] // 64) * 64  # embeddings padded past the tokenizer, as Phi-2's are
    cfg = checkpoint_config(family, vocab, ids, llm, sizes)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed + 1)
    tower = folder / "siglip_vision_tower"
    if family == "tinyllava-legacy":  # the SigLIP tower ships as its own checkpoint (fp16 pytorch_model.bin)
        tower.mkdir()
        (tower / "config.json").write_text(json.dumps(TINY["siglip"], indent=2))
    new_layout = family in ("llava-gemma", "tiny-llava-hf") and layout == "new"
    spec = detect(cfg, folder, ["model.language_model."] if new_layout else [])
    if dtype is None:
        model = VLM(spec)
        _randomize(model, seed)
        state = {k: v.detach() for k, v in model.state_dict().items()}
    else:  # full size: built on the meta device, tensors made shard by shard
        with torch.device("meta"):
            model = VLM(spec)
        state = _lazy_random_state(model, seed, dtype)
    if spec.text.tie_word_embeddings:
        state.pop("text.lm_head.weight")
    vcfg = sizes[spec.vision.arch]
    vision = {k: v for k, v in state.items() if k.startswith("vision.")}
    rest = {k: v for k, v in state.items() if not k.startswith("vision.")}
    if family == "tinyllava-legacy":
        tower_state = _to_checkpoint(vision, spec.vision_key_rules)
        tower_state.update(_extra_vision(vcfg, "vision_model.", spec.vision.num_layers, gen))
        torch.save({k: v.half() for k, v in tower_state.items()}, tower / "pytorch_model.bin")
        stale = {k: torch.randn(v.shape, generator=gen) for k, v in tower_state.items()}  # outdated copy
        ckpt = _to_checkpoint(rest, spec.key_rules)
        ckpt.update({"model.vision_tower.vision_tower." + k: v for k, v in stale.items()})
    else:
        ckpt = _to_checkpoint(state, spec.key_rules)
        vision_prefix = next(c for c, o in spec.key_rules if o == "vision.layers.")[:-len("encoder.layers.")]
        ckpt.update(_extra_vision(vcfg, vision_prefix, spec.vision.num_layers, gen))
    shards = 3 if family == "llava-gemma" else 2
    if dtype is not None:  # ~2 GB shards
        params = sum(math.prod(p.shape) for p in model.parameters())
        shards = max(shards, math.ceil(params * dtype.itemsize / 2e9))
    save_sharded(ckpt, folder, DTYPE[family] if dtype is None else dtype, shards=shards)
    if family == "llava-gemma":  # Intel's repo keeps the pre-conversion shards beside the real ones
        save_file({"model.embed_tokens.weight": torch.randn(vocab, cfg["text_config"]["hidden_size"],
                                                               generator=gen, dtype=dtype or torch.float32)},
                  folder / "model-00001-of-00002.safetensors")
    if family in ("llava-gemma", "tiny-llava-hf"):
        (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PROCESSOR, indent=2))
    if family == "mipha":
        (folder / "preprocessor_config.json").write_text(json.dumps(SIGLIP_PROCESSOR, indent=2))
    if family == "tinyllava" and llm == "phi":  # the Phi-2 Factory model ships the slow tokenizer's files only
        (folder / "tokenizer.json").unlink(missing_ok=True)
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids.get("pad")}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
