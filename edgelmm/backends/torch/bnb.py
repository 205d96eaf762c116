"""Load-time quantization with bitsandbytes (``EdgeLMM.load(path, quantize="nf4" | "fp4" | "int8")``): the language
model's linears (and, with ``quantize_vision``, the vision tower's) become bitsandbytes layers on the meta device
before the loader reads a tensor, and each quantizes its weight as it arrives (edgelmm.models.bnb_linear).
The linears quantized are the ones the memory planner counts as quantized (``edgelmm.plan.memory.part_of``):
embeddings, the LM head and the connector stay in the model's dtype."""
from __future__ import annotations

import torch
from torch import nn

from edgelmm.errors import ConfigError, MissingDependencyError
from edgelmm.plan.memory import BNB_METHODS, part_of

INSTALL = "pip install edgelmm[bnb]"


def check_method(method: str) -> str:
    """``method`` if it is one bitsandbytes quantization edgelmm loads with, else ConfigError."""
    if method not in BNB_METHODS:
        raise ConfigError(f"unknown quantize={method!r}; use one of {', '.join(BNB_METHODS)} (bitsandbytes)")
    return method


def require_bitsandbytes(method: str, device: torch.device, dtype: torch.dtype):
    """The ``edgelmm.models.bnb_linear`` module, once bitsandbytes has imported and run one ``method`` layer on
    ``device`` in ``dtype``; MissingDependencyError naming the extra to install otherwise (never a silent
    fallback to full precision)."""
    check_method(method)
    try:
        from edgelmm.models import bnb_linear
    except ImportError as e:
        raise MissingDependencyError(f"quantize={method!r} needs bitsandbytes ({e.msg}); install it with "
                                     f"`{INSTALL}`") from None
    try:
        with torch.device("meta"):
            probe = bnb_linear.streamed_linear(nn.Linear(64, 64), method, dtype)
        probe.weight = torch.ones(64, 64, device=device, dtype=dtype)
        probe.bias = nn.Parameter(torch.zeros(64, device=device, dtype=dtype), requires_grad=False)
        probe(torch.ones(1, 64, device=device, dtype=dtype))  # (1, 64)
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingDependencyError(f"bitsandbytes cannot run {method} on {device.type} in {dtype} here ({reason}); "
                                     f"install a build with this backend (`{INSTALL}`) or load without quantize=") \
            from None
    return bnb_linear


def quantized_names(model: nn.Module, quantize_vision: bool) -> list[str]:
    """The ``nn.Linear`` modules of ``model`` that ``quantize=`` replaces: the language model's decoder linears,
    plus the vision tower's with ``quantize_vision``."""
    parts = {"llm weights", "vision tower"} if quantize_vision else {"llm weights"}
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and part_of(f"{name}.weight") in parts]


def use_bnb_linears(model: nn.Module, method: str, dtype: torch.dtype, device: torch.device,
                    quantize_vision: bool = False) -> list[str]:
    """Replace, in a meta-device ``model``, each linear :func:`quantized_names` lists by a meta-device bitsandbytes
    layer computing in ``dtype``, so the loader quantizes it as its weight is read; return the replaced names."""
    bnb_linear = require_bitsandbytes(method, device, dtype)
    names = quantized_names(model, quantize_vision)
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, bnb_linear.streamed_linear(model.get_submodule(name), method, dtype))
    return names
