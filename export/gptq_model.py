"""Quantizing a loaded edgelmm VLM, block by block, with bounded memory.

GPTQ: the calibration samples run through our own model (image features spliced into the prompt), and the
inputs of the first block (decoder layer 0; vision layer 0 with ``quantize_vision``) are captured for every
sample. Then, for each block in turn: forward hooks accumulate one Hessian per distinct linear input (q/k/v
share one, and Phi's fc1 too, since its MLP reads the same normed input), the block's linears are quantized,
their dequantized weights are swapped in, and the block is re-run to produce the next block's inputs, so
each block is calibrated on what the quantized model before it produces. At any time memory holds the model,
one block's Hessians and two sets of block activations. RTN needs no data and quantizes every weight directly.

Results are the packed GPTQ tensors (packed at once, so they take bits/32 of the float weights' memory),
keyed by the linear's module name in the VLM (e.g. ``"text.layers.0.self_attn.q_proj"``).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edgelmm.checkpoint.json_file import read_json
from edgelmm.checkpoint.loader import WeightFiles
from edgelmm.export.calibration import calibration_samples
from edgelmm.export.gptq_settings import QuantSettings
from edgelmm.export.quantize import GPTQ, QuantResult, rtn_quantize
from edgelmm.families import detect
from edgelmm.families.tinygptv import is_description
from edgelmm.models.kv_cache import KVCache
from edgelmm.models.vlm import VLM


def load_dtype(source: Path, settings: QuantSettings | None) -> torch.dtype:
    """The dtype an export loads the checkpoint folder ``source`` in. RTN (and an unquantized ONNX export,
    ``settings`` None) reads weights only, so it loads them as stored: half the memory of fp32 for a 16-bit
    checkpoint, same results, since rounding and the fp32 graph weights are computed from exact fp32 upcasts.
    GPTQ runs calibration forwards, which want fp32 on a CPU (fp16 matmuls there are emulated), as does a
    vision tower that may come from another folder (--quantize-vision). TinyGPT-V (a description file) merges
    LoRA into its weights at load, so it loads in fp32 too."""
    if is_description(source) or settings is not None and (settings.method != "rtn" or settings.quantize_vision):
        return torch.float32
    files = WeightFiles(source)
    folders = [files]
    vision_dir = detect(read_json(source / "config.json"), source, files.keys()).vision_dir
    if vision_dir is not None:  # legacy TinyLLaVA: the vision tower's own checkpoint counts too
        folders.append(WeightFiles(vision_dir))
    floats = {d for d in (f.dtype(key) for f in folders for key in f.keys()) if d.is_floating_point}
    return floats.pop() if len(floats) == 1 and floats <= {torch.float16, torch.bfloat16} else torch.float32


@dataclass
class QuantizedModel:
    """What the pass produced: per-linear packed tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``),
    the input-sharing groups of one decoder layer's linears (names relative to the layer), the largest damp
    any layer needed, and the linears left unquantized because their shapes cannot be packed."""

    results: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    max_damp: float = 0.0
    samples: int = 0
    skipped: list[str] = field(default_factory=list)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once a block's input is seen."""


Item = tuple[tuple, dict]  # one sample's (args, kwargs) for a block


def capture_input(module: nn.Module, run: Callable[[], object]) -> Item:
    """The (args, kwargs) ``module`` is first called with while ``run()`` executes; the forward pass is
    abandoned at that point."""
    seen = []

    def hook(_module, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was never called")
    return seen[0]


class HessianHooks:
    """Forward hooks feeding each linear's inputs to a GPTQ Hessian. Within one sample, linears called with
    the very same input tensor share one Hessian, accumulated once per input; ``groups`` lists the linear
    names sharing each Hessian, in call order. Call :meth:`new_sample` before each sample."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.gptq: dict[str, GPTQ] = {}
        self.groups: list[list[str]] = []
        self._group_of: dict[int, list[str]] = {}
        self._seen: list[tuple[torch.Tensor, GPTQ]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def new_sample(self) -> None:
        self._seen = []

    def _hook(self, name: str):
        def hook(module: nn.Linear, args: tuple, _output) -> None:
            x = args[0]  # [..., K]
            match = next((g for seen, g in self._seen if seen is x), None)
            if name not in self.gptq:
                owner = match
                if owner is None:
                    owner = GPTQ(module.in_features)
                    self._group_of[id(owner)] = []
                    self.groups.append(self._group_of[id(owner)])
                self.gptq[name] = owner
                self._group_of[id(owner)].append(name)
            gptq = self.gptq[name]
            if match is not gptq:  # the first linear to read this input accumulates it
                gptq.add_batch(x.detach())
                self._seen.append((x, gptq))
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen = []


def quantizable(linear: nn.Linear, bits: int) -> bool:
    """GPTQ packing needs both dimensions to be multiples of 32 / bits."""
    pf = 32 // bits
    return linear.in_features % pf == 0 and linear.out_features % pf == 0


def _linears(module: nn.Module, prefix: str, bits: int, out: QuantizedModel) -> dict[str, nn.Linear]:
    found = {}
    modules = [("", module)] if isinstance(module, nn.Linear) else module.named_modules()
    for name, m in modules:
        if isinstance(m, nn.Linear):
            full = f"{prefix}.{name}" if name else prefix
            if quantizable(m, bits):
                found[full] = m
            else:
                out.skipped.append(full)
    return found


def _swap(linear: nn.Linear, result: QuantResult) -> None:
    linear.weight.data.copy_(result.dequantize())  # [N, K], the weights the exported model will use


def _quantize_linears(linears: dict[str, nn.Linear], hooks: HessianHooks | None, s: QuantSettings,
                      out: QuantizedModel) -> None:
    for name, linear in linears.items():
        w = linear.weight.detach()  # [N, K]
        gptq = hooks.gptq.get(name) if hooks is not None else None
        if gptq is None:  # RTN, or a linear the calibration forward never reached
            result = rtn_quantize(w, s.bits, s.group_size, s.sym)
        else:
            result = gptq.quantize(w, s.bits, s.group_size, s.sym, act_order=s.act_order,
                                   static_groups=s.act_order, damp=s.damp)
            out.max_damp = max(out.max_damp, result.damp)
        out.results[name] = result.pack(s.bits, s.checkpoint_format)
        _swap(linear, result)


@dataclass
class Block:
    """One step of the sequential pass: ``module`` named ``name`` in the VLM, and ``step`` mapping one
    sample's input to the next block's input (it may run more than ``module``)."""

    name: str
    module: nn.Module
    step: Callable[[Item], Item]


def _layer(name: str, layer: nn.Module) -> Block:
    """A block of a layer stack: its output replaces the first argument; the other arguments (rotary
    tables, cache, positions) pass through to the next layer unchanged."""
    def step(item: Item) -> Item:
        args, kwargs = item
        return (layer(*args, **kwargs), *args[1:]), kwargs
    return Block(name, layer, step)


def _run_block(block: Block, inputs: list[Item], s: QuantSettings, out: QuantizedModel,
               keep_outputs: bool) -> list[Item]:
    linears = _linears(block.module, block.name, s.bits, out)
    hooks = HessianHooks(linears)
    try:
        for item in inputs:
            hooks.new_sample()
            block.step(item)
    finally:
        hooks.remove()
    if block.name == "text.layers.0":
        out.groups = [[n[len("text.layers.0."):] for n in g] for g in hooks.groups]
    _quantize_linears(linears, hooks, s, out)
    del hooks
    return [block.step(item) for item in inputs] if keep_outputs else []


@torch.inference_mode()
def gptq_quantize_model(model: VLM, pixels: list[torch.Tensor], ids: list[torch.Tensor],
                        s: QuantSettings, progress: bool = True) -> QuantizedModel:
    """GPTQ-quantize ``model`` in place (dequantized weights swapped in) on calibration samples given as
    preprocessed ``pixels`` [1, 3, S, S] and prompt ``ids`` [1, T] (image positions marked)."""
    out = QuantizedModel(samples=len(pixels))
    t = model.spec.text
    max_len = max(x.shape[1] for x in ids)
    cache = KVCache(1, t.num_kv_heads, t.head_dim, max_len, device=pixels[0].device)  # one layer at a time
    vision = model.vision.layers if s.quantize_vision else []
    total = len(vision) + bool(vision) + len(model.text.layers) + s.quantize_lm_head
    bar = tqdm(total=total, desc="GPTQ", unit="block", file=sys.stderr, disable=not progress)
    if vision:
        xs = [capture_input(vision[0], lambda p=p: model.vision(p)) for p in pixels]
        for i, layer in enumerate(vision):
            bar.set_postfix_str(f"vision.layers.{i}")
            xs = _run_block(_layer(f"vision.layers.{i}", layer), xs, s, out, keep_outputs=i + 1 < len(vision))
            bar.update()
        bar.set_postfix_str("projector")
        _run_block(Block("projector", model.projector, lambda item: model.encode_image(*item[0])),
                   [((p,), {}) for p in pixels], s, out, keep_outputs=False)
        bar.update()
    embeds = [model.splice(i, model.encode_image(p)) for p, i in zip(pixels, ids)]  # each [1, T, D]
    first = model.text.layers[0]
    xs = [capture_input(first, lambda e=e: model.text(e, cache, 0)) for e in embeds]  # layer 0 of a 1-layer cache
    blocks = [_layer(f"text.layers.{i}", layer) for i, layer in enumerate(model.text.layers)]
    for i, block in enumerate(blocks):
        bar.set_postfix_str(block.name)
        xs = _run_block(block, xs, s, out, keep_outputs=i + 1 < len(blocks))
        bar.update()
    if s.quantize_lm_head:  # its input is the final norm's output: run the whole (quantized) decoder
        bar.set_postfix_str("text.lm_head")
        full = KVCache(t.num_layers, t.num_kv_heads, t.head_dim, max_len, device=pixels[0].device)
        _run_block(Block("text.lm_head", model.text.lm_head, lambda item: model.text(*item[0], full, 0, False)),
                   [((e,), {}) for e in embeds], s, out, keep_outputs=False)
        bar.update()
    bar.close()
    return out


@torch.inference_mode()
def rtn_quantize_model(model: VLM, s: QuantSettings, progress: bool = True) -> QuantizedModel:
    """Round-to-nearest quantization of the same linears GPTQ would quantize, in place, without data."""
    out = QuantizedModel()
    parts = [(f"text.layers.{i}", layer) for i, layer in enumerate(model.text.layers)]
    if s.quantize_vision:
        parts = [(f"vision.layers.{i}", v) for i, v in enumerate(model.vision.layers)] + [
            ("projector", model.projector)] + parts
    if s.quantize_lm_head:
        parts.append(("text.lm_head", model.text.lm_head))
    for name, module in tqdm(parts, desc="RTN", unit="block", file=sys.stderr, disable=not progress):
        linears = _linears(module, name, s.bits, out)
        if name == "text.layers.0":
            out.groups = [[n[len(name) + 1:]] for n in linears]
        _quantize_linears(linears, None, s, out)
    return out


def quantize_model(lm, s: QuantSettings, calibration=None, samples: int = 32, progress: bool = True) -> QuantizedModel:
    """Quantize the torch model of the loaded EdgeLMM ``lm`` in place: RTN, or GPTQ on ``samples``
    calibration samples from the folder ``calibration`` (None: the built-in synthetic set)."""
    model = lm.backend.model
    if s.method == "rtn":
        return rtn_quantize_model(model, s, progress)
    data = calibration_samples(calibration, samples)
    pixels = [torch.from_numpy(lm.pixels(d.image)) for d in data]  # each [1, 3, S, S]
    ids = [torch.tensor([lm.prompt_ids(d.prompt)[1]]) for d in data]  # [1, T], image positions marked
    return gptq_quantize_model(model, pixels, ids, s, progress)
