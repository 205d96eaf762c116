"""Fused kernels (Triton) with plain-PyTorch references; importing this package never imports triton.

Use :func:`load_ops` once per model to bind the implementations for a device; the op modules
(``prefill_attention``, ``decode_attention``, ``gptq_matmul``, ``norms``, ``rotary``) are imported lazily.
"""

from edgelmm.kernels.dispatch import KernelOps, load_ops

__all__ = ["KernelOps", "load_ops"]
