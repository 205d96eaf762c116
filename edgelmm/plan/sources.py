"""Memory plans of what a user names: a checkpoint folder, a GPTQ or ONNX export, a TinyGPT-V description
file, or a released model's full-size shape (nothing on disk)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from edgelmm.backends.onnx import ops as ort_ops
from edgelmm.backends.onnx.config import OnnxConfig, external_data_path, is_onnx_export, prefill_chunk
from edgelmm.config import EvaConfig, EvaQFormerConfig, QFormerConfig, TextConfig
from edgelmm.errors import ConfigError
from edgelmm.families.tinygptv import (
    Description,
    bert_config,
    is_description,
    projection_dim,
    text_config,
    tinygptv_spec,
)
from edgelmm.plan.memory import (
    MemoryPlan,
    PlanSettings,
    plan_memory,
    prompt_tokens,
    vision_size,
    workspace_bytes,
)


def plan_for(source: str, settings: PlanSettings, budget: int | None = None) -> MemoryPlan:
    """Plan a checkpoint folder (unquantized or a GPTQ export: its bits and group size are used), an ONNX
    export (:func:`plan_onnx_export`), a TinyGPT-V description file, or a named full-size shape
    (``edgelmm.synthetic.shapes.SHAPES``, ``tinygpt-v``, or a released model's hub name such as ``Mipha-3B`` when no
    such folder exists)."""
    folder = Path(source).expanduser()
    if is_onnx_export(folder):  # torch-free, like the backend that runs it
        return plan_onnx_export(folder, settings.context, budget, settings.overhead)
    import torch

    from edgelmm.families import detect
    from edgelmm.models.vlm import VLM
    from edgelmm.synthetic.shapes import SHAPE_ALIASES, shape_config

    if is_description(folder):
        return _plan_tinygptv(settings, budget, folder)
    shape = None if folder.is_dir() else SHAPE_ALIASES.get(source.rstrip("/").split("/")[-1].lower())
    if shape == "tinygpt-v":
        return _plan_tinygptv(settings, budget)
    if shape:
        cfg = shape_config(shape)
    elif (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
        quant = cfg.get("quantization_config") or {}
        if quant.get("quant_method") == "gptq":
            settings = replace(settings, bits=quant["bits"], group_size=quant["group_size"])
    else:
        raise ConfigError(f"{source!r} is neither a checkpoint folder nor a known shape "
                          f"({', '.join(sorted(set(SHAPE_ALIASES.values())))})")
    spec = detect(cfg, folder, [])
    with torch.device("meta"):
        model = VLM(spec)
    return plan_memory(model, spec.vision.num_image_tokens, vision_size(spec.vision), settings, budget)


def _plan_tinygptv(settings: PlanSettings, budget: int | None, description: Path | None = None) -> MemoryPlan:
    """TinyGPT-V: EVA ViT-g/14 + Q-Former + the modified Phi-2 (docs/model-formats.md §3), from a description file's
    configs (its stage's image size, Phi-2's and BERT's config.json), else the released stage-4 sizes."""
    import torch

    from edgelmm.models.tinygptv import TinyGPTV
    from edgelmm.synthetic.shapes import FULL

    if settings.quantize_vision:
        raise ConfigError("TinyGPT-V's EVA + Q-Former are not GPTQ-quantized (--quantize-vision); its 4-bit ONNX "
                          "export runs EVA in int8: plan that export folder instead")
    if description is not None:
        desc = Description.read(description)
        text, eva = text_config(desc), desc.eva
        qformer = QFormerConfig.from_bert(bert_config(desc.pieces["qformer_config"]), eva.width, 32)
        visual = EvaQFormerConfig(eva, qformer, projection_dim(desc))
    else:
        text = TextConfig.from_hf(FULL["phi"], "phi")
        text.qk_layernorm = text.post_attention_rmsnorm = True
        eva = EvaConfig(image_size=448)
        visual = EvaQFormerConfig(eva, QFormerConfig())
    with torch.device("meta"):
        model = TinyGPTV(tinygptv_spec(text, visual))
    return plan_memory(model, visual.num_image_tokens, vision_size(visual), settings, budget)


def plan_onnx_export(folder: Path, context: int | None = None, budget: int | None = None,
                     overhead: int = 0) -> MemoryPlan:
    """Plan an ``edgelmm export --format onnx`` folder, torch-free: each graph's weights as written (onnxruntime
    repacks ``MatMulNBits`` weights into about their size and drops the file's copy; edgelmm's CPU ops read
    them as written), the KV cache for ``context`` positions (default: the export's context) in the export's
    I/O dtype, or as ``EDGELMM_ONNX_KV`` says on edgelmm's CPU attention op, image features and activations."""
    cfg = OnnxConfig.read(folder)
    spec, text = cfg.spec, cfg.spec.text
    io_bytes = 4 if cfg.io_dtype == "float32" else 2
    cpu_ops = ort_ops.applies(cfg.target, cfg.io_dtype)
    cache = ort_ops.kv_cache() if cpu_ops else cfg.io_dtype
    context = min(context or cfg.context_length, cfg.context_length)
    plan = MemoryPlan(budget=budget)
    graphs = (("vision graph", cfg.vision), ("embedding graph", cfg.embedding), ("decoder graph", cfg.decoder))
    for part, graph in graphs:
        plan.parts[part] = sum(f.stat().st_size for f in (graph, external_data_path(graph)) if f.is_file())
    plan.parts["kv cache"] = 2 * text.num_layers * text.num_kv_heads * context * ort_ops.cache_row_bytes(
        text.head_dim, cache)
    image_tokens = spec.vision.num_image_tokens
    plan.parts["image features"] = image_tokens * text.hidden_size * io_bytes
    settings = PlanSettings(context=context, dtype_bytes=io_bytes)
    prompt = prompt_tokens(image_tokens, settings)
    chunk = min(prompt, prefill_chunk() or prompt)  # the prompt tokens one decoder run holds activations for
    # + onnxruntime's GroupQueryAttention probabilities on CPU: every head's prompt rows against the whole
    # shared KV buffer (edgelmm's op keeps none); x2: onnxruntime's CPU arena grows in powers of two and keeps
    # what it reserved
    scores = 0 if cpu_ops else text.num_heads * chunk * context * io_bytes
    plan.parts["activations"] = 2 * (workspace_bytes(text, chunk, vision_size(spec.vision), io_bytes) + scores)
    if overhead:
        plan.parts["runtime overhead"] = overhead
    q = cfg.quantization
    plan.notes.update({
        "decoder graph": f"{q['bits']}-bit block {q['block_size']}" if q.get("bits", 16) < 16 else cfg.io_dtype,
        "vision graph": "int8 per channel" if q.get("vision_bits") == 8 else "",
        "kv cache": f"{cache + (' + a scale per row' if cache == 'int8' else '')}, {context} tokens",
        "image features": f"{image_tokens} tokens",
        "activations": f"prefill of {prompt} tokens" + (f" in chunks of {chunk}" if chunk < prompt else "")
                       + ", x2 for the arena" + (
            f", incl. attention scores (+{2 * scores / max(chunk, 1) / 1e6:.2f} MB per longer prompt token)"
            if scores else " (edgelmm's attention keeps no score matrix)")})
    return plan
