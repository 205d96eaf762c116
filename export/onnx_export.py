"""``edgelmm export --format onnx``: a checkpoint (or a TinyGPT-V description file) as three ONNX graphs
(vision, embedding, decoder) in the onnxruntime-genai multimodal layout, plus ``genai_config.json``
(edgelmm/backends/onnx/config.py), the tokenizer and processor files, and the ``edgelmm.json`` manifest — written to a
temporary folder, renamed when complete. TinyGPT-V's vision graph is export/onnx_tinygptv.py.

The decoder's linears are quantized by the GPTQ export's own pipeline (export/gptq_model.py: GPTQ on
calibration data, or RTN) and repacked into ``MatMulNBits``; ``bits=16`` keeps them as fp ``MatMul``.
The LM head is quantized to ``lm_head_bits`` (RTN, default 8) unless ``--quantize-lm-head`` puts it through
the main pipeline; the token embedding table is stored in fp16 by quantized exports. The vision tower and
connector are, by default on CPU, int8 per output channel (``vision_bits=8``: ``DynamicQuantizeMatMul``,
an int8 GEMM over a quarter of the fp32 weight bytes), GPTQ-quantized like the decoder with
``--quantize-vision``, or fp (``vision_bits=16``, the CUDA default). TinyGPT-V's Q-Former and projections stay
fp (see :func:`vision_int8`).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from edgelmm import __version__
from edgelmm.api import EdgeLMM
from edgelmm.backends.onnx.config import (
    CONFIG_NAME,
    DECODER_FILE,
    EMBEDDING_FILE,
    VISION_FILE,
    make_genai_config,
)
from edgelmm.backends.torch.tinygptv import Description
from edgelmm.checkpoint.manifest import write_manifest
from edgelmm.checkpoint.staging import check_new, staging
from edgelmm.errors import ConfigError, UnsupportedModelError
from edgelmm.export.gptq_model import load_dtype, quantizable, quantize_model
from edgelmm.export.gptq_settings import QuantSettings
from edgelmm.export.gptq_writer import copy_side_files
from edgelmm.export.onnx_decoder import build_decoder
from edgelmm.export.onnx_graph import save_model
from edgelmm.export.onnx_tinygptv import build_tinygptv_vision
from edgelmm.export.onnx_vision import build_embedding, build_vision
from edgelmm.export.onnx_weights import Int8Channels, Packed, channel_int8, decoder_linears, decoder_norms
from edgelmm.export.quantize import rtn_quantize
from edgelmm.families.tinygptv import TINYGPTV_FAMILY, is_description

TARGETS = {"cpu": "float32", "cuda": "float16"}


def _untie_lm_head(text: nn.Module) -> None:
    if text.lm_head.weight is text.embed_tokens.weight:
        text.lm_head.weight = nn.Parameter(text.embed_tokens.weight.detach().clone(), requires_grad=False)


INT8_PARTS = ("vision.", "projector.")  # the vision tower and LLaVA's connector: where the image's tokens are


def vision_int8(model: nn.Module) -> Int8Channels:
    """Quantize the vision tower's and LLaVA connector's linears to int8 per output channel, in place (the
    model keeps the dequantized weights). TinyGPT-V's Q-Former and projections stay fp: they see 32 query
    tokens (little compute), and per-tensor activation quantization compounds through the Q-Former's twelve
    post-norm layers, far more than through any one linear (the errors: docs/design-measurements.md)."""
    results = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(INT8_PARTS):
            q = channel_int8(module.weight)
            module.weight.data.copy_(torch.from_numpy(q.q).t() * torch.from_numpy(q.scales)[:, None])
            results[name] = q
    return Int8Channels(results)


def default_vision_bits(settings: QuantSettings | None, target: str) -> int:
    """8 (int8 vision) for quantized CPU exports unless the vision tower goes through GPTQ; else 16."""
    return 8 if settings is not None and not settings.quantize_vision and target == "cpu" else 16


@torch.inference_mode()
def quantize_for_onnx(lm: EdgeLMM, settings: QuantSettings | None, lm_head_bits: int | None = 8,
                      calibration=None, samples: int = 32, progress: bool = False,
                      vision_bits: int = 16) -> list[Packed | Int8Channels]:
    """Quantize ``lm``'s torch model in place, leaving in it exactly the weights the export will hold
    (dequantized linears, fp16-rounded embedding table), so the torch backend can serve as its reference.
    Returns the quantized tensors to repack; empty for an unquantized (``settings=None``) export."""
    model = lm.backend.model
    vision = [vision_int8(model)] if vision_bits == 8 else []
    if settings is None:
        return vision
    _untie_lm_head(model.text)
    quantized = quantize_model(lm, settings, calibration, samples, progress)
    packed = [Packed(quantized.results, settings.bits, settings.checkpoint_format)]
    if lm_head_bits is not None and not settings.quantize_lm_head and quantizable(model.text.lm_head, lm_head_bits):
        head = model.text.lm_head
        result = rtn_quantize(head.weight.detach().float(), lm_head_bits, settings.group_size, True)
        head.weight.data.copy_(result.dequantize())
        packed.append(Packed({"text.lm_head": result.pack(lm_head_bits, "gptq")}, lm_head_bits, "gptq"))
    table = model.text.embed_tokens.weight
    table.data.copy_(table.to(torch.float16).float())  # the export stores the table in fp16
    return packed + vision


def quantization_info(settings: QuantSettings | None, packed: list[Packed | Int8Channels], accuracy_level: int,
                      vision_bits: int) -> dict:
    """What the config and manifest record about the export's quantization (``lm_head_bits`` 16 when the
    head stayed fp, e.g. because its shape cannot be packed)."""
    vision = {"vision_bits": vision_bits} if vision_bits == 8 else {}
    if settings is None:
        return {"bits": 16, "method": None, **vision}
    head = next((p.bits for p in packed if isinstance(p, Packed) and "text.lm_head" in p.results), 16)
    return {**settings.as_dict(), "block_size": settings.group_size, "lm_head_bits": head,
            "accuracy_level": accuracy_level, "embedding_dtype": "float16",
            "vision_bits": settings.bits if settings.quantize_vision else vision_bits}


def export_onnx(model_dir: str | Path, out: str | Path, settings: QuantSettings | None, target: str = "cpu",
                accuracy_level: int | None = None, lm_head_bits: int | None = 8, calibration=None,
                samples: int = 32, progress: bool = True, vision_bits: int | None = None) -> Path:
    """Export the checkpoint folder (or TinyGPT-V description file) ``model_dir`` to the new folder ``out``
    (layout in the module docstring).

    ``settings`` None means unquantized (``--bits 16``). ``target`` "cpu" writes fp32 graphs, "cuda" fp16.
    ``accuracy_level`` is MatMulNBits' compute type (default 4 = int8 on CPU, 0 on CUDA). ``vision_bits``
    8 or 16 (default: :func:`default_vision_bits`)."""
    if target not in TARGETS:
        raise ConfigError(f"--target must be one of {sorted(TARGETS)}, got {target!r}")
    if vision_bits not in (None, 8, 16):
        raise ConfigError(f"--vision-bits must be 8 or 16, got {vision_bits}")
    if vision_bits == 8 and settings is not None and settings.quantize_vision:
        raise ConfigError("--vision-bits 8 and --quantize-vision both quantize the vision tower; choose one")
    if vision_bits == 8 and target == "cuda":
        raise ConfigError("--vision-bits 8 is a CPU path (DynamicQuantizeMatMul has no fp16 CUDA kernel); "
                          "use --quantize-vision for a quantized vision tower on CUDA")
    dtype = TARGETS[target]
    level = accuracy_level if accuracy_level is not None else (4 if target == "cpu" else 0)
    vision_bits = vision_bits or default_vision_bits(settings, target)
    start = time.perf_counter()
    out, source = check_new(out), Path(model_dir).expanduser()
    if settings is not None and settings.quantize_vision and is_description(source):
        raise UnsupportedModelError("--quantize-vision covers LLaVA-style vision towers, not TinyGPT-V's EVA + "
                                    "Q-Former; its quantized CPU export already runs EVA in int8 (--vision-bits 8)")
    with staging(out) as tmp:
        # context_length=1: no KV cache worth the name (GPTQ calibration brings its own one-layer cache)
        lm = EdgeLMM.load(source, device="cpu", dtype=load_dtype(source, settings), context_length=1)
        spec, model = lm.spec, lm.backend.model
        packed = quantize_for_onnx(lm, settings, lm_head_bits, calibration, samples, progress, vision_bits)
        info = quantization_info(settings, packed, level, vision_bits)
        vision_graph = build_tinygptv_vision if spec.family == TINYGPTV_FAMILY else build_vision
        save_model(vision_graph(model, packed, dtype, level), tmp / VISION_FILE)
        table = "float16" if settings is not None else dtype
        save_model(build_embedding(model, list(spec.image_ids), table, dtype), tmp / EMBEDDING_FILE)
        decoder = build_decoder(spec.text, decoder_linears(model.text, packed), decoder_norms(model.text), dtype, level)
        del lm, model, packed
        save_model(decoder, tmp / DECODER_FILE)
        del decoder
        (tmp / CONFIG_NAME).write_text(json.dumps(make_genai_config(spec, target, dtype, info), indent=2) + "\n")
        if spec.family == TINYGPTV_FAMILY:  # a description file: the tokenizer is Phi-2's
            copy_side_files(Description.read(source).pieces["phi2"], tmp, keep_config=False)
        else:
            copy_side_files(source, tmp, keep_config=True)  # tokenizer, processor, generation and model configs
        write_manifest(tmp, {"family": spec.family, "template": spec.template, "backend": "onnx",
                             "image_tokens": spec.vision.num_image_tokens, "source": source.name,
                             "exporter": f"edgelmm {__version__}", "target": target, "quantization": info})
    if progress:
        print(f"wrote {out} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return out
