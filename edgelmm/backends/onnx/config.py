"""``genai_config.json``: the file tying an ONNX export's three graphs together (torch-free).

It follows the onnxruntime-genai Phi-3-vision layout (docs/quant-formats.md §3.6) — ``model.vision``,
``model.embedding`` and ``model.decoder`` sections naming each graph's file and I/O — plus an ``edgelmm``
section holding what the runtime needs that genai's schema has no place for::

    {"model": {"type": "edgelmm_llava", "vocab_size": V, "context_length": C,
               "vision":    {"filename": "vision.onnx", "inputs": {"pixel_values": ...},
                             "outputs": {"image_features": ...}, "num_image_tokens": N},
               "embedding": {"filename": "embedding.onnx",
                             "inputs": {"input_ids": ..., "image_features": ...},
                             "outputs": {"inputs_embeds": ...}, "image_token_ids": [-200, ...]},
               "decoder":   {"filename": "decoder.onnx", "head_size", "hidden_size", "num_attention_heads",
                             "num_hidden_layers", "num_key_value_heads",
                             "inputs": {"inputs_embeds", "attention_mask", "past_key_names": "past_key_values.%d.key",
                                        "past_value_names": "past_key_values.%d.value"},
                             "outputs": {"logits", "present_key_names": "present.%d.key",
                                         "present_value_names": "present.%d.value"}}},
     "search": {"max_length": C, "past_present_share_buffer": true, ...},
     "edgelmm": {"target": "cpu" | "cuda", "io_dtype": "float32" | "float16", "logits": "last",
                 "quantization": {...}, "spec": {family, text, vision, image, template, ...}}}

Decoder contract: ``inputs_embeds [B, S, D]``, ``attention_mask`` int64 ``[B, past + S]`` (ones), and per
layer ``past_key_values.i.key/value [B, Hkv, P, Dh]`` where P is either the past length or, when past and
present share one buffer (what edgelmm's runtime does), the whole cache capacity; ``present.i.key/value``
have the same layout. ``logits`` are ``[B, 1, V]`` for the last position only (``edgelmm.logits: "last"``;
genai graphs return all positions). Embedding contract: ids equal to any of ``image_token_ids`` take the next
row of ``image_features [B, N, D]`` (flattened), in order; other ids take their token embedding.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from edgelmm.config import EvaConfig, EvaQFormerConfig, QFormerConfig, TextConfig, VisionConfig
from edgelmm.errors import CheckpointError, ConfigError, EdgeLMMError
from edgelmm.families.tinygptv import TINYGPTV_FAMILY, tinygptv_spec
from edgelmm.processing.image import ImageSpec
from edgelmm.spec import ModelSpec

CONFIG_NAME = "genai_config.json"
IO_DTYPES = ("float32", "float16")
VISION_FILE, EMBEDDING_FILE, DECODER_FILE = "vision.onnx", "embedding.onnx", "decoder.onnx"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def prefill_chunk() -> int:
    """Most prompt tokens per decoder run, ``EDGELMM_PREFILL_CHUNK`` (default 512; 0: a whole prompt at once).
    Longer prompts run in equal chunks, each attending to the cache the ones before wrote: the prefill's
    activation memory stops growing with the prompt. Each extra chunk streams the weights once more (its cost:
    docs/design-measurements.md)."""
    value = os.environ.get("EDGELMM_PREFILL_CHUNK", "512").strip()
    if not (value.isascii() and value.isdigit()):
        raise ConfigError(f"EDGELMM_PREFILL_CHUNK must be a token count (0: no chunks), got {value!r}")
    return int(value)


def chunk_bounds(seq: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of the equal decoder runs of at most ``chunk`` tokens (0: no limit) a ``seq``-token prompt
    takes."""
    size = -(-seq // -(-seq // chunk)) if chunk and seq > chunk else max(seq, 1)
    return [(start, min(start + size, seq)) for start in range(0, seq, size)]


def spec_to_dict(spec: ModelSpec) -> dict:
    """The runtime-relevant part of a spec as JSON-ready data (no key rules, no vision folder)."""
    d = {"family": spec.family, "text": asdict(spec.text), "vision": asdict(spec.vision), "image": asdict(spec.image),
         "template": spec.template, "image_token_id": spec.image_token_id, "context_length": spec.context_length}
    if isinstance(spec.vision, VisionConfig):  # LLaVA-style: a projector
        d["projector_act"] = spec.projector_act
    return d


def spec_from_dict(d: dict) -> ModelSpec:
    """Inverse of :func:`spec_to_dict`."""
    text, image = TextConfig(**d["text"]), ImageSpec(**d["image"])
    if d["family"] == TINYGPTV_FAMILY:
        v = d["vision"]
        visual = EvaQFormerConfig(EvaConfig(**v["eva"]), QFormerConfig(**v["qformer"]), v["proj_dim"])
        return tinygptv_spec(text, visual, d["context_length"])
    return ModelSpec(family=d["family"], text=text, vision=VisionConfig(**d["vision"]),
                     projector_act=d["projector_act"], image=image, template=d["template"],
                     image_token_id=d["image_token_id"], key_rules=(), context_length=d["context_length"])


def make_genai_config(spec: ModelSpec, target: str, io_dtype: str, quantization: dict) -> dict:
    """The config of an export of ``spec`` (layout in the module docstring)."""
    t = spec.text
    context = min(spec.context_length, t.max_position_embeddings)
    return {
        "model": {
            "type": "edgelmm_llava", "vocab_size": t.vocab_size, "context_length": context,
            "vision": {"filename": VISION_FILE, "inputs": {"pixel_values": "pixel_values"},
                       "outputs": {"image_features": "image_features"},
                       "num_image_tokens": spec.vision.num_image_tokens},
            "embedding": {"filename": EMBEDDING_FILE,
                          "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                          "outputs": {"inputs_embeds": "inputs_embeds"}, "image_token_ids": list(spec.image_ids)},
            "decoder": {"filename": DECODER_FILE, "head_size": t.head_dim, "hidden_size": t.hidden_size,
                        "num_attention_heads": t.num_heads, "num_hidden_layers": t.num_layers,
                        "num_key_value_heads": t.num_kv_heads,
                        "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                                   "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
                        "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY,
                                    "present_value_names": PRESENT_VALUE}},
        },
        "search": {"do_sample": False, "max_length": context, "num_beams": 1, "past_present_share_buffer": True},
        "edgelmm": {"target": target, "io_dtype": io_dtype, "logits": "last", "quantization": quantization,
                    "spec": spec_to_dict(spec)},
    }


@dataclass(frozen=True, slots=True)
class OnnxConfig:
    """A parsed ``genai_config.json``: the model spec, the three graph paths and the export settings."""

    spec: ModelSpec
    vision: Path
    embedding: Path
    decoder: Path
    target: str
    io_dtype: str
    context_length: int
    image_token_ids: tuple[int, ...]
    quantization: dict

    @classmethod
    def read(cls, folder: Path) -> OnnxConfig:
        """Parse ``folder/genai_config.json``; CheckpointError when it is missing or malformed."""
        path = Path(folder) / CONFIG_NAME
        try:
            cfg = json.loads(path.read_text())
            model, ours = cfg["model"], cfg["edgelmm"]
            config = cls(spec=spec_from_dict(ours["spec"]), vision=path.parent / model["vision"]["filename"],
                       embedding=path.parent / model["embedding"]["filename"],
                       decoder=path.parent / model["decoder"]["filename"], target=ours["target"],
                       io_dtype=ours["io_dtype"], context_length=int(model["context_length"]),
                       image_token_ids=tuple(model["embedding"]["image_token_ids"]),
                       quantization=ours.get("quantization", {}))
        except EdgeLMMError:  # a spec value the config checks refuse, named by them
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{path} not found; is {folder} an `edgelmm export --format onnx` folder?") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError,
                OverflowError) as e:
            raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); export the model again") from None
        config.check(path)
        return config

    def check(self, path: Path) -> None:
        """CheckpointError naming ``path`` when a setting has a value no export writes."""
        ids_ok = all(isinstance(i, int) and not isinstance(i, bool) for i in self.image_token_ids)
        problems = {"target": self.target not in ("cpu", "cuda"), "io_dtype": self.io_dtype not in IO_DTYPES,
                    "context_length": self.context_length < 1, "image_token_ids": not ids_ok,
                    "quantization": not isinstance(self.quantization, dict)}
        for graph in ("vision", "embedding", "decoder"):  # graph files must lie in the export's folder
            problems[graph] = getattr(self, graph).parent != path.parent
        bad = next((name for name, wrong in problems.items() if wrong), None)
        if bad is not None:
            raise CheckpointError(f"{path} has {bad} {getattr(self, bad)!r}, which no export writes; the file is "
                                  "damaged, export the model again")


def external_data_path(graph: Path) -> Path:
    """Where a graph's weights go beyond the export's external-data limit: ``<graph>.data`` beside it."""
    return Path(graph).with_name(Path(graph).name + ".data")


def is_onnx_export(folder: Path) -> bool:
    """Whether ``folder`` holds an ONNX export (its genai_config.json names an edgelmm model)."""
    return (Path(folder) / CONFIG_NAME).is_file()
