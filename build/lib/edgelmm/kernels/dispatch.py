"""Choose the kernel implementations once per process/model: Triton on CUDA, PyTorch's own fused ops
(``native.py``) elsewhere.

``EDGELMM_KERNELS=torch|triton|reference`` overrides the choice (``reference``: the plain fp32 oracles). Triton on CPU tensors runs only under the
interpreter (``TRITON_INTERPRET=1``, for tests). triton is imported here only when the Triton path is chosen.
"""

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgelmm.errors import ConfigError

_OPS = {  # KernelOps field -> (module, function stem)
    "prefill_attention": ("prefill_attention", "prefill_attention"),
    "decode_attention": ("decode_attention", "decode_attention"),
    "gptq_matmul": ("gptq_matmul", "gptq_matmul"),
    "rms_norm": ("norms", "rms_norm"),
    "layer_norm": ("norms", "layer_norm"),
    "rotary": ("rotary", "rotary"),
}


@dataclass(frozen=True, slots=True)
class KernelOps:
    """The op implementations bound for one device; every callable writes into caller-provided outputs.

    Signatures (identical for both backends; layouts in each ``*_triton`` docstring):
      prefill_attention(q, k, v, out, sm_scale, causal)
      decode_attention(q, k_cache, v_cache, kv_lens, out, sm_scale, *, k_scale, v_scale, part_out, part_lse)
      gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, out, *, bits, group_size, zero_v1)
      rms_norm(x, weight, out, eps, *, residual, residual_out, gemma)
      layer_norm(x, weight, bias, out, eps, *, residual, residual_out)
      rotary(x, cos, sin, out, rotary_dim)
    """

    backend: str  # "triton", "torch" (native.py) or "reference"
    prefill_attention: Callable
    decode_attention: Callable
    gptq_matmul: Callable
    rms_norm: Callable
    layer_norm: Callable
    rotary: Callable


def _choose_backend(device: torch.device) -> str:
    override = os.environ.get("EDGELMM_KERNELS", "").strip().lower()
    if override not in ("", "torch", "triton", "reference"):
        raise ConfigError(f"EDGELMM_KERNELS must be 'torch', 'triton' or 'reference', got {override!r}")
    if override in ("torch", "reference"):
        return override
    has_triton = importlib.util.find_spec("triton") is not None
    if override == "triton":
        if not has_triton:
            raise ConfigError("EDGELMM_KERNELS=triton but triton is not installed; "
                              "pip install edgelmm[triton]")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"EDGELMM_KERNELS=triton on {device} needs CUDA, "
                              "or TRITON_INTERPRET=1 (tests only)")
        return "triton"
    return "triton" if device.type == "cuda" and has_triton else "torch"


def load_ops(device: torch.device | str) -> KernelOps:
    """Bind every op for ``device`` once (call when a model loads, keep the result)."""
    backend = _choose_backend(torch.device(device))
    ops = {}
    for field, (module, stem) in _OPS.items():
        if backend == "torch":
            ops[field] = getattr(importlib.import_module(f"{__package__}.native"), stem + "_native")
        else:
            suffix = "_triton" if backend == "triton" else "_ref"
            ops[field] = getattr(importlib.import_module(f"{__package__}.{module}"), stem + suffix)
    return KernelOps(backend=backend, **ops)
