"""An independent TinyGPT-V reference, assembled from transformers' modules following upstream's code path
(DLYuanGod/TinyGPT-V: ``minigpt4.py::encode_img``, ``minigpt_base.py::get_context_emb``, the patched
``modeling_phi.py``), never from edgelmm's model code:

- EVA ViT-g: ``Blip2VisionModel`` (BLIP-2's port of LAVIS' EVA: fused qkv with [q_bias, 0, v_bias], CLS,
  bicubic position interpolation), taking the encoder output before its ``post_layernorm``;
- ``ln_vision``: ``torch.nn.LayerNorm``; Q-Former: ``Blip2QFormerModel``; projections: ``nn.Linear``;
- modified Phi-2: ``PhiForCausalLM(qk_layernorm=True)`` with q/k/v rows picked from the fused
  ``query_key_value`` by upstream's ``view(B, T, heads, 3, head_dim)`` order, and TinyGPT-V's post-attention
  RMSNorm (transformers' ``LlamaRMSNorm``) chained after ``dense``;
- LoRA applied unmerged, as forward hooks adding (alpha/r) * B(A(x)) to the fused output's q/k/v parts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from reference import load_strict, read_state
from torch import nn

IMAGE_HERE = "<ImageHere>"


def _eva(eva: dict, vision: dict) -> nn.Module:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    width, depth = vision["width"], vision["depth"]
    grid = int((eva["pos_embed"].shape[1] - 1) ** 0.5)
    model = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=width, intermediate_size=int(width * 4.3637), num_hidden_layers=depth,
        num_attention_heads=vision["heads"], patch_size=vision["patch_size"], image_size=grid * vision["patch_size"],
        hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True))
    state = {"embeddings.class_embedding": eva["cls_token"], "embeddings.position_embedding": eva["pos_embed"],
             "embeddings.patch_embedding.weight": eva["patch_embed.proj.weight"],
             "embeddings.patch_embedding.bias": eva["patch_embed.proj.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            state[f"{dst}{b}.weight"], state[f"{dst}{b}.bias"] = eva[f"{src}{a}.weight"], eva[f"{src}{a}.bias"]
        state[dst + "self_attn.qkv.weight"] = eva[src + "attn.qkv.weight"]
        q, v = eva[src + "attn.q_bias"], eva[src + "attn.v_bias"]
        state[dst + "self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    missing, _ = model.load_state_dict(state, strict=False)
    assert all(k.startswith("post_layernorm") for k in missing), missing
    return model.eval()


def _qformer(blip2: dict, bert: dict, width: int) -> nn.Module:
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    model = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=bert["hidden_size"], num_hidden_layers=bert["num_hidden_layers"],
        num_attention_heads=bert["num_attention_heads"], intermediate_size=bert["intermediate_size"],
        hidden_act=bert["hidden_act"], layer_norm_eps=bert["layer_norm_eps"], cross_attention_frequency=2,
        encoder_hidden_size=width))
    state = {"layernorm." + k[len("Qformer.bert.embeddings.LayerNorm."):]: v for k, v in blip2.items()
             if k.startswith("Qformer.bert.embeddings.LayerNorm.")}
    for k, v in blip2.items():
        if k.startswith("Qformer.bert.encoder."):
            state[k[len("Qformer.bert."):].replace(".self.", ".attention.")] = v
    load_strict(model, state)
    return model.eval()


def _phi(folder: Path, stage: dict, scale: float) -> nn.Module:
    from transformers import PhiConfig, PhiForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    cfg = json.loads((folder / "config.json").read_text())
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    lm = PhiForCausalLM(PhiConfig(**{**fields, "qk_layernorm": True}))
    heads, d = cfg["num_attention_heads"], cfg["hidden_size"]
    hd = d // heads
    files = read_state(folder)
    state = {}
    for k, v in files.items():
        if ".query_key_value." not in k:
            state[k] = v
            continue
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # fused row h*3*hd + j*hd + e
            rows = [h * 3 * hd + j * hd + e for h in range(heads) for e in range(hd)]
            state[k.replace("query_key_value", proj)] = v[rows]
    trained = {k.split("llama_model.", 1)[1].removeprefix("base_model.model."): v for k, v in stage.items()
               if k.startswith("llama_model.") and ".lora_" not in k}
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("q_layernorm", "k_layernorm"):  # absent from the Phi-2 files: fresh LayerNorm bias
            state[f"model.layers.{i}.self_attn.{norm}.bias"] = torch.zeros(hd)
    state.update({k: v.float() for k, v in trained.items() if "post_layernorm" not in k})
    load_strict(lm, state)
    for i, layer in enumerate(lm.model.layers):
        attn = layer.self_attn
        a = stage.get(f"llama_model.base_model.model.model.layers.{i}.self_attn.query_key_value.lora_A.weight")
        if a is not None:
            b = stage[f"llama_model.base_model.model.model.layers.{i}.self_attn.query_key_value.lora_B.weight"]
            for j, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                proj.register_forward_hook(
                    lambda mod, inp, out, a=a, b=b, j=j: out + (scale * (inp[0] @ a.T) @ b.T).view(
                        *out.shape[:-1], heads, 3, hd)[..., j, :].flatten(-2))
            a = stage[f"llama_model.base_model.model.model.layers.{i}.self_attn.dense.lora_A.weight"]
            b = stage[f"llama_model.base_model.model.model.layers.{i}.self_attn.dense.lora_B.weight"]
            attn.dense.register_forward_hook(lambda mod, inp, out, a=a, b=b: out + scale * (inp[0] @ a.T) @ b.T)
        post = LlamaRMSNorm(d, eps=1e-6)
        post.weight.data = trained[f"model.layers.{i}.post_layernorm.weight"].float()
        attn.dense = nn.Sequential(attn.dense, post)  # post_layernorm(dense(attention))
    return lm.eval()


class TinyGPTVReference:
    """Upstream TinyGPT-V on a description file's pieces (fp32, unmerged LoRA, full recompute per token)."""

    def __init__(self, description: Path):
        from transformers import AutoTokenizer
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        d = json.loads(description.read_text())
        root = description.parent
        eva = torch.load(root / d["eva_vit"])
        blip2 = torch.load(root / d["qformer"])["model"]
        ckpt = torch.load(root / d["checkpoint"])
        stage = ckpt["model"]
        bert = json.loads((root / d["qformer_config"] / "config.json").read_text())
        self.vision = _eva(eva, d["vision"])
        self.ln_vision = nn.LayerNorm(d["vision"]["width"])
        self.ln_vision.load_state_dict({"weight": blip2["ln_vision.weight"], "bias": blip2["ln_vision.bias"]})
        self.query_tokens = blip2["query_tokens"]
        self.qformer = _qformer(blip2, bert, d["vision"]["width"])
        self.proj, self.proj2 = (nn.Linear(*stage[f"{n}.weight"].shape[::-1]) for n in ("llama_proj", "llama_proj2"))
        load_strict(self.proj, {k[len("llama_proj."):]: v for k, v in stage.items() if k.startswith("llama_proj.")})
        load_strict(self.proj2, {k[len("llama_proj2."):]: v for k, v in stage.items() if k.startswith("llama_proj2.")})
        rank = next((v.shape[0] for k, v in stage.items() if ".lora_A." in k), 1)
        self.lm = _phi(root / d["phi2"], stage, ckpt["config"]["model"]["lora_alpha"] / rank)
        self.tokenizer = AutoTokenizer.from_pretrained(root / d["phi2"])
        size = 448 if d["stage"] == 4 else 224
        self.processor = BlipImageProcessorPil(size={"height": size, "width": size})  # bicubic, CLIP mean/std

    def pixels(self, image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def eva(self, pixels: torch.Tensor) -> torch.Tensor:
        """All tokens of the last EVA block (no final norm)."""
        embeds = self.vision.embeddings(pixels, interpolate_pos_encoding=True)
        return self.vision.encoder(inputs_embeds=embeds).last_hidden_state

    @torch.no_grad()
    def qformer_out(self, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state

    @torch.no_grad()
    def image_features(self, image) -> torch.Tensor:
        queries = self.qformer_out(self.ln_vision(self.eva(self.pixels(image))))
        return self.proj2(self.proj(queries))[0]  # (32, D): no activation between the projections

    def segments(self, question: str) -> list[list[int]]:
        """get_context_emb: split the prompt at <ImageHere>; special tokens only on the first segment."""
        prompt = f"###Human: <Img>{IMAGE_HERE}</Img> {question}###Assistant: "
        segments = prompt.split(IMAGE_HERE)
        return [self.tokenizer(seg, add_special_tokens=i == 0).input_ids for i, seg in enumerate(segments)]

    @torch.no_grad()
    def logits(self, question: str, features: torch.Tensor, answer: list[int]) -> torch.Tensor:
        before, after = self.segments(question)
        embed = self.lm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(before)), features, embed(torch.tensor(after + answer))])[None]
        return self.lm(inputs_embeds=embeds).logits[0]

    def greedy(self, image, question: str, steps: int) -> tuple[torch.Tensor, list[int]]:
        """Prompt logits and ``steps`` greedy tokens, recomputing the whole sequence every step."""
        features = self.image_features(image)
        first = self.logits(question, features, [])
        out: list[int] = []
        for _ in range(steps):
            out.append(int(self.logits(question, features, out)[-1].argmax()))
        return first, out
