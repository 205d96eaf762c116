"""edgelmm's onnxruntime custom ops for the CPU decoder: ``MatMulNBits`` (4- and 8-bit, int8 compute) on an
AVX512-VNNI int4/int8 x int8 GEMM/GEMV (Phi's following FastGelu fused in, or its whole MLP as ``GeluMlpNBits``),
and ``GroupQueryAttention`` as causal block attention over an fp16, fp32 or int8 KV cache (with the q|k|v
projection before it fused in as ``QkvGroupQueryAttention``: a prompt's q|k|v made a few heads at a time).
Their scratch comes from onnxruntime's arena, where it reuses memory the graph's activations freed.

nbits_kernels.c packs each 64-column tile's weights into one stream and feeds ``vpdpbusd`` from it (4-bit: in
an assembly micro-kernel; the GEMV for one token streams each column once). It reads the exported
``MatMulNBits`` weights as they are, so onnxruntime keeps no repacked copy of them, and it quantizes
activations exactly as onnxruntime does (symmetric int8 per row and block), so the outputs agree with
onnxruntime's kernel to rounding. Its rate beside onnxruntime's: docs/design-measurements.md.
gqa_kernels.c never computes the masked half of a prompt's attention and, with the fp16 cache, reads half the
bytes per decode step.

The library is compiled once, on first use, with the system C compiler into ``cache_root()/ort_ops`` and
used only for fp32 CPU exports on x86-64 Linux CPUs with AVX512-VNNI; ``EDGELMM_ORT_OPS=0`` turns it off,
``EDGELMM_ONNX_KV`` picks the cache: ``float16`` (default), ``float32`` (the export's), or ``int8`` (each
cached row quantized with its own scale: about half the fp16 cache's memory, a somewhat larger logit error; see
the README). Without the ops the decoder runs onnxruntime's own kernels with the export's fp32 cache.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from edgelmm.backends.onnx.ops.rewrite import CACHE_OPS, DOMAIN, rewrite_model
from edgelmm.errors import ConfigError
from edgelmm.paths import cache_root

SOURCES = ("nbits_kernels.c", "gqa_kernels.c", "matmul_op.c", "gqa_op.c", "norm_op.c", "register.c")
HEADERS = ("ort_api.h", "kernels.h", "nbits_op.h", "vec_math.h")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c")
CFLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
          "-mavx512vnni", "-mfma", "-mf16c")

__all__ = ["DOMAIN", "applies", "cpu_flags", "cache_row_bytes", "cache_row_elements", "kv_cache", "library", "rewrite_model",
           "unavailable_reason"]
_CACHE_ELEMENT_BYTES = {"float32": 4, "float16": 2, "int8": 1}
INT8_ROW_SCALE_BYTES = 4  # an int8 cache row: head_dim values, then their fp32 scale
_KV_ALIASES = {"fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32", "i8": "int8"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def unavailable_reason() -> str | None:
    """Why the ops cannot be used here, or None when they can."""
    if os.environ.get("EDGELMM_ORT_OPS", "1").lower() in ("0", "off", "false", "no"):
        return "turned off by EDGELMM_ORT_OPS"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"built for x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    missing = [f for f in CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if not _compiler():
        return "no C compiler (cc/gcc) to build it"
    return None


def kv_cache() -> str:
    """The KV cache dtype of the attention op, ``EDGELMM_ONNX_KV``: "float16" (default), "float32" or "int8"."""
    value = os.environ.get("EDGELMM_ONNX_KV", "float16").strip().lower()
    value = _KV_ALIASES.get(value, value)
    if value not in CACHE_OPS:
        raise ConfigError(f"EDGELMM_ONNX_KV must be float16, float32 or int8, got {value!r}")
    return value


def cache_row_elements(head_dim: int, cache: str) -> int:
    """Elements of one cached key/value row of the ``cache`` dtype: int8 rows carry their fp32 scale after the
    values (gqa_kernels.c ``cache_row_bytes``)."""
    return head_dim + INT8_ROW_SCALE_BYTES if cache == "int8" else head_dim


def cache_row_bytes(head_dim: int, cache: str) -> int:
    """Bytes of one cached key/value row of the ``cache`` dtype."""
    return cache_row_elements(head_dim, cache) * _CACHE_ELEMENT_BYTES[cache]


def applies(target: str, io_dtype: str) -> bool:
    """Whether an export of this target and I/O dtype runs its decoder on the ops here (building them if needed):
    fp32 CPU exports, where the ops are available."""
    return target == "cpu" and io_dtype == "float32" and library() is not None


def library() -> Path | None:
    """The compiled custom-op library (built once per source version, on first use), or None when it cannot
    be used here (see ``unavailable_reason``) or failed to build (with a note on stderr)."""
    return None if unavailable_reason() else _build()


def _sha256_path(library_path: Path) -> Path:
    return library_path.with_name(library_path.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library_path: Path) -> bool:
    """Whether a cached library exists and still has the sha256 recorded beside it when it was built (a
    truncated or replaced file is built again)."""
    try:
        return _sha256_path(library_path).read_text().strip() == _sha256(library_path)
    except OSError:
        return False


@lru_cache(maxsize=1)
def _build() -> Path | None:
    here = Path(__file__).parent
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
        sources = "\0".join((here / s).read_text() for s in SOURCES + HEADERS)
        digest = hashlib.sha256("\0".join([*CFLAGS, version, sources]).encode()).hexdigest()[:16]
        target = cache_root() / "ort_ops" / f"libedgelmm_ort_ops-{digest}.so"
        if _intact(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"edgelmm: building edgelmm's CPU ops once into {target.parent} (about 10 s)", file=sys.stderr,
              flush=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, renamed when complete
            built = Path(tmp) / target.name
            result = subprocess.run([cc, *CFLAGS, "-o", str(built), *(str(here / s) for s in SOURCES)],
                                    capture_output=True, text=True, check=False)
            if result.returncode:
                raise OSError(f"{cc}: {result.stderr.strip()[-500:]}")
            _sha256_path(built).write_text(_sha256(built))
            os.replace(_sha256_path(built), _sha256_path(target))
            os.replace(built, target)
        return target
    except OSError as e:
        print(f"edgelmm: could not build edgelmm's CPU ops, using onnxruntime's kernels ({e})", file=sys.stderr)
        return None
