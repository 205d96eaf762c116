"""Bytes of weights one decode step reads, per system (torch modules, ONNX graphs): the numerator of the
bandwidth the benchmark reports."""
from __future__ import annotations

from pathlib import Path


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def torch_decode_bytes(text) -> int:
    """Weight bytes one decode step reads from a TextModel-like module: everything but the rotary tables and
    the embedding table (one row read), unless the LM head is tied to it (then read in full once)."""
    embed = text.embed_tokens.weight
    tensors = [t for n, t in [*text.named_parameters(), *text.named_buffers()] if not n.startswith("rope_")]
    tied = text.lm_head.weight.data_ptr() == embed.data_ptr()
    return _bytes(tensors) - (0 if tied else embed.numel() * embed.element_size() - embed[0].numel() * embed.element_size())


def onnx_decode_bytes(path: Path, skip: str = "embed_tokens") -> int:
    """Initializer bytes of an ONNX graph (external data included) minus a ``skip`` table (one row read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        size = int(ext["length"]) if "length" in ext else len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
        total += size // max(1, init.dims[0]) if skip in init.name and init.dims else size
    return total
