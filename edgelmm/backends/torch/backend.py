"""The PyTorch backend: loads a checkpoint folder into edgelmm's own model and runs prefill/decode over a
static KV cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgelmm.backends.torch.bnb import check_method, use_bnb_linears
from edgelmm.backends.torch.gptq import GPTQSettings, check_quant_linears, read_gptq_config, use_quant_linears
from edgelmm.checkpoint.finite import require_finite
from edgelmm.checkpoint.json_file import read_json
from edgelmm.checkpoint.loader import WeightFiles, check_layer_count, load_into
from edgelmm.errors import ConfigError
from edgelmm.families import detect
from edgelmm.models.kv_cache import KVCache
from edgelmm.models.layers import bind_kernels
from edgelmm.models.vlm import VLM
from edgelmm.plan.memory import PlanSettings, parse_size, plan_memory, require_fit, vision_size
from edgelmm.spec import ModelSpec

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device, dtype) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when available unless asked) and dtype (fp16 on CUDA and fp32 on CPU unless asked;
    torch dtypes and their usual names) a model loads in."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        return device, torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return device, dtype
    try:
        return device, _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


class TorchBackend:
    """A VLM, its static KV cache and the device/dtype it runs in."""

    def __init__(self, model: VLM, cache: KVCache):
        self.model, self.cache, self.spec = model, cache, model.spec
        self.max_seq_len = cache.max_seq_len

    @classmethod
    def load(cls, folder: Path, device=None, dtype=None, vision_tower=None,
             context_length: int | None = None, max_memory=None, quantize: str | None = None,
             quantize_vision: bool = False) -> TorchBackend:
        device, dtype = resolve_device(device, dtype)
        if quantize is not None:
            check_method(quantize)
        files = WeightFiles(folder)
        cfg = read_json(folder / "config.json")
        spec = detect(cfg, folder, files.keys(), vision_tower)
        embed_key = next((k for k in files.keys() if k.endswith("embed_tokens.weight")), None)
        if embed_key:  # the real vocabulary size is the embedding's row count, not the config's
            spec.text.vocab_size = files.shape(embed_key)[0]
        sources = [(files, spec.key_rules)]
        if spec.vision_dir is not None:
            sources.append((WeightFiles(spec.vision_dir), spec.vision_key_rules))
        check_layer_count("text.layers.", sources, spec.text.num_layers, spec.text.num_layers)
        check_layer_count("vision.layers.", sources, spec.vision.num_layers, spec.vision.config_layers)
        with torch.device("meta"):
            model = VLM(spec)
        gptq = read_gptq_config(folder, cfg)
        if gptq is not None and quantize is not None:
            raise ConfigError(f"{folder} is already GPTQ-quantized; load it without quantize={quantize!r}")
        if max_memory is not None:
            check_budget(model, spec, dtype, context_length, max_memory, gptq, bnb=quantize,
                         quantize_vision=quantize_vision)
        if gptq is not None:  # quantized linears become QuantLinear before their buffers are loaded
            use_quant_linears(model, sources, gptq, device)
        if quantize is not None:  # bitsandbytes layers, each quantized as the loader assigns its weight
            use_bnb_linears(model, quantize, dtype, device, quantize_vision)
        load_into(model, sources, dtype, device)
        if gptq is not None:
            check_quant_linears(model, gptq)
        return cls.ready(model, context_length, dtype, device)

    @classmethod
    def ready(cls, model: nn.Module, context_length: int | None, dtype: torch.dtype,
              device: torch.device) -> TorchBackend:
        """The backend of a model whose weights are loaded: rotary tables on ``device``, kernels bound once,
        eval mode, and a KV cache for its context (or ``context_length`` if smaller)."""
        model.text.init_rope(device)
        bind_kernels(model, device)
        model.eval()
        return cls(model, new_cache(model.spec, context_length, dtype, device))

    @property
    def device(self) -> torch.device:
        return self.cache.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.data.dtype

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray) -> torch.Tensor:
        return self.model.encode_image(torch.from_numpy(pixels).to(self.device, self.dtype))  # (1, N, D)

    @torch.inference_mode()
    def prefill(self, ids: list[int], features: torch.Tensor) -> np.ndarray:
        embeds = self.model.splice(torch.tensor([ids], device=self.device), features)  # (1, T, D)
        return require_finite(self.model.text(embeds, self.cache, start=0)[0, -1].cpu().numpy(), "prefill")

    @torch.inference_mode()
    def decode(self, token: int, position: int) -> np.ndarray:
        ids = torch.tensor([[token]], device=self.device)  # (1, 1)
        logits = self.model.text(self.model.text.embed(ids), self.cache, start=position)[0, -1].cpu().numpy()  # [V]
        return require_finite(logits, f"decode at position {position}")

    @torch.inference_mode()
    def prompt_logits(self, ids: list[int], features: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] at every prompt position (for tests and quality measurements)."""
        embeds = self.model.splice(torch.tensor([ids], device=self.device), features)
        return self.model.text(embeds, self.cache, start=0, last_only=False)[0]


def check_budget(model: VLM, spec: ModelSpec, dtype: torch.dtype, context_length: int | None, max_memory,
                 gptq: GPTQSettings | None = None,
                 export: str = "a quantized export (edgelmm export --bits 4)", bnb: str | None = None,
                 quantize_vision: bool = False) -> None:
    """Refuse up front, with the plan, a model that cannot fit ``max_memory`` (e.g. "8GB"); a GPTQ
    checkpoint's linears are planned at their ``gptq`` bits and group size, a ``bnb`` (nf4 / fp4 / int8) load's
    as bitsandbytes stores them. ``export`` names the smaller export the error suggests."""
    size = torch.empty((), dtype=dtype).element_size()
    quant = {"bits": gptq.bits, "group_size": gptq.group_size} if gptq is not None else {}
    settings = PlanSettings(dtype_bytes=size, kv_bits=8 * size, context=context_limit(spec, context_length),
                            bnb=bnb, quantize_vision=quantize_vision, **quant)
    plan = plan_memory(model, spec.vision.num_image_tokens, vision_size(spec.vision), settings, parse_size(max_memory))
    require_fit(plan, f"Use {export}, a smaller dtype, or a shorter context_length.")


def context_limit(spec: ModelSpec, context_length: int | None) -> int:
    """The positions the KV cache holds: the model's context, or ``context_length`` if smaller."""
    return min(context_length or spec.context_length, spec.text.max_position_embeddings)


def new_cache(spec: ModelSpec, context_length: int | None, dtype: torch.dtype, device: torch.device) -> KVCache:
    """A KV cache for the model's context, or ``context_length`` if smaller."""
    t = spec.text
    return KVCache(t.num_layers, t.num_kv_heads, t.head_dim, context_limit(spec, context_length), dtype=dtype,
                   device=device)
