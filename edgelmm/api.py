"""EdgeLMM: the public facade. ``EdgeLMM.load(path).ask(image, prompt)``."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError, PromptTooLongError
from .families import detect
from .generate import StopStringFilter, generate_ids
from .image import load_image, preprocess
from .kv_cache import KVCache
from .loader import WeightFiles, load_into, read_json
from .models.vlm import IMAGE_PLACEHOLDER, VLM
from .sampling import SamplingParams
from .spec import ModelSpec
from .templates import IMAGE_TAG, TEMPLATES, Template
from .tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Generation:
    """One answer: ``text``, the generated ``token_ids``, the exact rendered ``prompt`` fed to the
    tokenizer, and ``timings`` in seconds (preprocess, vision, prefill, decode)."""

    text: str
    token_ids: list[int]
    prompt: str
    timings: dict[str, float] = field(default_factory=dict)


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


class EdgeLMM:
    """A loaded vision-language model with its tokenizer, image preprocessing, template and KV cache."""

    def __init__(self, model: VLM, tokenizer: Tokenizer, spec: ModelSpec, cache: KVCache, path: Path):
        self.model, self.tokenizer, self.spec, self.cache, self.path = model, tokenizer, spec, cache, path
        self.template: Template = TEMPLATES[spec.template]
        self.stop_ids = {i for i in (tokenizer.token_to_id(s) for s in self.template.stop) if i is not None}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)

    @classmethod
    def load(cls, path, device=None, dtype=None, vision_tower=None, context_length: int | None = None) -> "EdgeLMM":
        """Load an unmodified checkpoint folder (TinyLLaVA Factory/legacy, HF Llava, Mipha), or a TinyGPT-V
        description ``.json`` naming its released pieces (see ``edgelmm.tinygptv``), offline.

        ``device`` defaults to CUDA when available, else CPU; ``dtype`` to fp16 on CUDA and fp32 on CPU.
        ``vision_tower`` points legacy TinyLLaVA at its separate SigLIP folder when it is not found beside
        the checkpoint. ``context_length`` caps the preallocated KV cache (default: the model's context)."""
        folder = Path(path).expanduser()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _resolve_dtype(dtype, device)
        if folder.suffix == ".json" and folder.is_file():  # a description file naming released pieces (TinyGPT-V)
            from .tinygptv import load_tinygptv
            return cls(*load_tinygptv(folder, device, dtype, context_length))
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder; pass the path of a checkpoint folder")
        files = WeightFiles(folder)
        spec = detect(read_json(folder / "config.json"), folder, files.keys(), vision_tower)
        embed_key = next((k for k in files.keys() if k.endswith("embed_tokens.weight")), None)
        if embed_key:  # the real vocabulary size is the embedding's row count, not the config's
            spec.text.vocab_size = files.shape(embed_key)[0]
        with torch.device("meta"):
            model = VLM(spec)
        sources = [(files, spec.key_rules)]
        if spec.vision_dir is not None:
            sources.append((WeightFiles(spec.vision_dir), spec.vision_key_rules))
        load_into(model, sources, dtype, device)
        model.text.init_rope(device)
        model.eval()
        limit = min(context_length or spec.context_length, spec.text.max_position_embeddings)
        t = spec.text
        cache = KVCache(t.num_layers, t.num_kv_heads, t.head_dim, limit, dtype=dtype, device=device)
        return cls(model, Tokenizer.from_dir(folder), spec, cache, folder)

    @property
    def device(self) -> torch.device:
        return self.cache.data.device

    def prompt_ids(self, prompt: str) -> tuple[str, list[int]]:
        """Render the template and tokenize it, with the image slot expanded to one id per image token."""
        text = self.template.render(prompt)
        n = self.spec.vision.num_image_tokens
        if self.spec.image_token_id is None:  # LLaVA codebase: tokenize around <image>, splice a sentinel
            before, after = text.split(IMAGE_TAG)
            return text, (self.tokenizer.encode(before, add_bos=self.template.add_bos) + [IMAGE_PLACEHOLDER] * n
                          + self.tokenizer.encode(after, add_bos=False))
        ids = self.tokenizer.encode(text, add_bos=self.template.add_bos)  # HF Llava: <image> is a real token
        out: list[int] = []
        for i in ids:
            out.extend([i] * n if i == self.spec.image_token_id else [i])
        return text, out

    def _run(self, image, prompt: str, params: SamplingParams, result: Generation) -> Iterator[str]:
        timings = result.timings
        t0 = time.perf_counter()
        pixels = torch.from_numpy(preprocess(load_image(image), self.spec.image))[None]  # (1, 3, S, S)
        result.prompt, ids = self.prompt_ids(prompt)
        if len(ids) >= self.cache.max_seq_len:
            raise PromptTooLongError(f"the prompt is {len(ids)} tokens (with {self.spec.vision.num_image_tokens} "
                                     f"image tokens) but the context holds {self.cache.max_seq_len}; shorten it")
        t1 = time.perf_counter()
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device, self.model.text.embed_tokens.weight.dtype))
            embeds = self.model.splice(torch.tensor([ids], device=self.device), features)  # (1, T, D)
        t2 = time.perf_counter()
        timings.update(preprocess=t1 - t0, vision=t2 - t1)
        stop_ids = self.stop_ids | set(params.stop_token_ids)
        text_filter = StopStringFilter(self.template.stop + params.stop)
        decoder, decoded = self.tokenizer.decode_stream(), ""
        tokens = generate_ids(self.model, embeds, self.cache, params, stop_ids)
        t3 = time.perf_counter()
        for token in tokens:
            if not result.token_ids:
                t3 = time.perf_counter()
                timings["prefill"] = t3 - t2
            result.token_ids.append(token)
            decoded += decoder.push(token)
            piece = text_filter.push(decoded)
            if piece:
                result.text += piece
                yield piece
            if text_filter.stopped:
                break
        timings.setdefault("prefill", time.perf_counter() - t2)
        timings["decode"] = time.perf_counter() - t3
        tail = text_filter.finish(decoded + decoder.flush())
        if tail:
            result.text += tail
            yield tail

    def generate(self, image, prompt: str, **sampling) -> Generation:
        """Answer ``prompt`` about ``image`` (a path, PIL image, bytes or numpy array); ``sampling`` takes
        the SamplingParams fields (max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids)."""
        result = Generation("", [], "")
        for _ in self._run(image, prompt, SamplingParams(**sampling), result):
            pass
        return result

    def stream(self, image, prompt: str, *, result: Generation | None = None, **sampling) -> Iterator[str]:
        """Like ``generate``, yielding the answer's text pieces as they are decoded. Pass an empty
        ``Generation`` as ``result`` to receive the token ids, prompt and timings as well."""
        yield from self._run(image, prompt, SamplingParams(**sampling), result or Generation("", [], ""))

    def ask(self, image, prompt: str, **sampling) -> str:
        """The answer's text."""
        return self.generate(image, prompt, **sampling).text
