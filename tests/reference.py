"""Independent references for the parity tests, assembled from transformers' own modules following each
family's documented code path (docs/model-formats.md), never from edgelmm's model code."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

SENTINEL = -200  # LLaVA's IMAGE_TOKEN_INDEX
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            state.update({k: f.get_tensor(k).float() for k in f.keys()})
    return state


def strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_strict(module: torch.nn.Module, state: dict, allow_unexpected: tuple[str, ...] = ()) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k and "position_ids" not in k]
    if getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        module.tie_weights()
        assert module.lm_head.weight.data_ptr() == module.get_input_embeddings().weight.data_ptr()
        missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if not k.startswith(allow_unexpected)]
    assert not missing and not unexpected, (missing[:5], unexpected[:5])


def expand2square(image: Image.Image, mean) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square canvas of the mean colour."""
    fill = tuple(int(m * 255) for m in mean)
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's tokenizer_image_token: tokenize around <image> and insert the sentinel (one BOS kept)."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    bos = tokenizer.bos_token_id
    ids, offset = [], 0
    if chunks[0] and bos is not None and chunks[0][0] == bos:
        offset, ids = 1, [bos]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(SENTINEL)
        ids.extend(chunk[offset:] if i == 0 or offset else chunk)
    return ids


class LlavaCodebaseReference:
    """TinyLLaVA Factory / legacy / Mipha: HF Siglip/CLIP vision model + mm_projector + HF causal LM,
    combined as in prepare_inputs_labels_for_multimodal."""

    def __init__(self, folder: Path, family: str):
        from transformers import (
            AutoTokenizer,
            CLIPVisionConfig,
            CLIPVisionModel,
            GemmaConfig,
            GemmaForCausalLM,
            LlamaConfig,
            LlamaForCausalLM,
            PhiConfig,
            PhiForCausalLM,
            Qwen2Config,
            Qwen2ForCausalLM,
            SiglipImageProcessor,
            SiglipVisionConfig,
            SiglipVisionModel,
        )
        cfg = json.loads((folder / "config.json").read_text())
        state = read_state(folder)
        self.family = family
        if family == "tinyllava":
            vcfg, tcfg = cfg["vision_config"], cfg["text_config"]
            vstate = strip(state, "vision_tower._vision_tower.")
            proj, lm_state = strip(state, "connector._connector."), strip(state, "language_model.")
            self.drop_first, self.pad = True, cfg["image_aspect_ratio"] == "pad"
        elif family == "tinyllava-legacy":
            tower = folder / "siglip_vision_tower"
            vcfg, tcfg = json.loads((tower / "config.json").read_text()), cfg
            vstate = {k: v.float() for k, v in torch.load(tower / "pytorch_model.bin").items()}
            proj = strip(state, "model.mm_projector.")
            lm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision"))}
            self.drop_first, self.pad = False, True
        else:  # mipha
            vcfg, tcfg = cfg["vision_config"]["vision_tower"], cfg
            vstate = strip(state, "model.vision_tower.")
            proj = strip(state, "model.mm_projector.")
            lm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision"))}
            self.drop_first, self.pad = False, True
        is_clip = vcfg["model_type"].startswith("clip")
        vision_fields = {k: v for k, v in vcfg.items() if not k.startswith(("mm_", "vision_model"))}
        if is_clip:
            self.vision = CLIPVisionModel(CLIPVisionConfig(**vision_fields))
            self.drop_first = True
        else:
            self.vision = SiglipVisionModel(SiglipVisionConfig(**vision_fields))
        if not hasattr(self.vision, "vision_model"):  # transformers 5 flattened the wrapper
            vstate = strip(vstate, "vision_model.")
        load_strict(self.vision, vstate, allow_unexpected=())
        self.proj = torch.nn.Sequential(torch.nn.Linear(*proj["0.weight"].shape[::-1]), torch.nn.GELU(),
                                        torch.nn.Linear(*proj["2.weight"].shape[::-1]))
        load_strict(self.proj, proj)
        arch = tcfg.get("model_type") if family == "tinyllava" else "phi"
        config_cls, lm_cls = {"phi": (PhiConfig, PhiForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
                              "gemma": (GemmaConfig, GemmaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
        fields = {k: v for k, v in tcfg.items() if not k.startswith(("mm_", "vision", "model_type", "architectures"))}
        self.lm = lm_cls(config_cls(**fields))
        if family == "tinyllava-legacy":  # bias-free lm_head: treat Phi's bias as zero
            lm_state["lm_head.bias"] = torch.zeros(self.lm.lm_head.bias.shape)
        load_strict(self.lm, lm_state)
        self.vision.eval(), self.lm.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        size = vcfg["image_size"]
        self.processor = SiglipImageProcessor(size={"height": size, "width": size})
        self.mean = self.processor.image_mean

    def prompt(self, question: str) -> str:
        return f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.pad:
            image = expand2square(image, self.mean)
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        hidden = self.vision(pixels, output_hidden_states=True).hidden_states[-2]
        if self.drop_first:
            hidden = hidden[:, 1:]
        return self.proj(hidden)[0]

    @torch.no_grad()
    def embeds(self, ids: list[int], features: torch.Tensor) -> torch.Tensor:
        cut = ids.index(SENTINEL)
        embed = self.lm.get_input_embeddings()
        before, after = embed(torch.tensor(ids[:cut])), embed(torch.tensor(ids[cut + 1:]))
        return torch.cat([before, features, after])[None]

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeds).logits[0]

    def prompt_ids(self, question: str) -> list[int]:
        return tokenizer_image_token(self.prompt(question), self.tokenizer)

    def greedy(self, image: Image.Image, question: str, steps: int) -> tuple[torch.Tensor, list[int]]:
        """Prompt logits and ``steps`` greedy tokens, recomputing the whole sequence every step."""
        features = self.image_features(image)
        ids = self.prompt_ids(question)
        first = self.logits(self.embeds(ids, features))
        out = []
        for _ in range(steps):
            logits = self.logits(self.embeds(ids + out, features))
            out.append(int(logits[-1].argmax()))
        return first, out


class HFLlavaReference:
    """transformers' LlavaForConditionalGeneration on the checkpoint folder, with its own image processor."""

    def __init__(self, folder: Path):
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration
        self.model, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                        output_loading_info=True)
        assert not info["missing_keys"], info["missing_keys"]
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        self.image_token = self.model.config.image_token_id
        vision = self.model.config.vision_config
        self.n_image = (vision.image_size // vision.patch_size) ** 2

    def prompt(self, question: str) -> str:
        if self.model.config.text_config.model_type == "gemma":
            chat = [{"role": "user", "content": f"<image>\n{question}"}]
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return f"USER: <image>\n{question}\nASSISTANT:"

    def prompt_ids(self, question: str) -> list[int]:
        text = self.prompt(question).replace("<image>", "<image>" * self.n_image)
        return self.tokenizer(text, add_special_tokens=not text.startswith("<bos>")).input_ids

    @torch.no_grad()
    def greedy(self, image: Image.Image, question: str, steps: int) -> tuple[torch.Tensor, list[int]]:
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        ids = self.prompt_ids(question)
        first = self.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        out = []
        for _ in range(steps):
            logits = self.model(input_ids=torch.tensor([ids + out]), pixel_values=pixels).logits[0]
            out.append(int(logits[-1].argmax()))
        return first, out


def reference_for(folder: Path, family: str):
    return HFLlavaReference(folder) if family in ("llava-gemma", "tiny-llava-hf") else \
        LlavaCodebaseReference(folder, family)


def sample_image(seed: int = 0, size=(300, 200)) -> Image.Image:
    """A structured, asymmetric test picture (gradients plus noise), so mirroring it changes the content."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x * y) % 256], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
