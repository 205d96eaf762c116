"""``edgelmm export --format gptq``: load a checkpoint, quantize its decoder (GPTQ on calibration data, or
RTN), and write a GPTQ checkpoint folder with an ``edgelmm.json`` manifest, atomically.

The export holds one full-precision (fp32) copy of the model, read one tensor at a time (no mapped shard
beside it) and with no KV cache; the source tensors it writes unquantized are re-read from the source files
one at a time, and quantized weights are kept only in packed form.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgelmm import __version__
from edgelmm.api import EdgeLMM
from edgelmm.checkpoint.manifest import write_manifest
from edgelmm.checkpoint.staging import check_new, staging
from edgelmm.errors import ConfigError, UnsupportedModelError
from edgelmm.export.gptq_model import load_dtype, quantize_model
from edgelmm.export.gptq_settings import QuantSettings, quantization_config
from edgelmm.export.gptq_writer import SHARD_BYTES, block_name, write_gptq_folder
from edgelmm.families.tinygptv import is_description
from edgelmm.process_memory import peak_rss_bytes


@dataclass
class ExportReport:
    """The written folder, wall time in seconds, peak resident memory in bytes, and linear counts."""

    out: Path
    seconds: float
    peak_rss: int
    quantized: int
    skipped: list[str]

    def summary(self) -> str:
        skipped = f", {len(self.skipped)} left in fp16 (shape not packable)" if self.skipped else ""
        return (f"wrote {self.out}: {self.quantized} linears quantized{skipped}; {self.seconds:.1f} s, "
                f"peak RSS {self.peak_rss / 2**30:.2f} GiB")


def export_gptq(model_dir: str | Path, out: str | Path, settings: QuantSettings, calibration: str | Path | None = None,
                samples: int = 32, progress: bool = True, shard_bytes: int = SHARD_BYTES,
                dtype: torch.dtype | None = None) -> ExportReport:
    """Export the checkpoint folder ``model_dir`` as a GPTQ checkpoint in the new folder ``out``.

    ``calibration`` is a calibration folder (see :mod:`edgelmm.export.calibration`); None uses the built-in
    synthetic set. ``samples`` caps the number of calibration samples (GPTQ only). ``dtype`` is the dtype
    the model is loaded in (default :func:`load_dtype`)."""
    start = time.perf_counter()
    out, source = check_new(out), Path(model_dir).expanduser()
    if is_description(source):
        raise UnsupportedModelError(f"{source.name} describes a model assembled from released pieces (TinyGPT-V), "
                                    "which has no checkpoint layout a GPTQ loader reads; use --format onnx")
    with staging(out) as tmp:
        # context_length=1: no KV cache worth the name (GPTQ calibration brings its own one-layer cache)
        lm = EdgeLMM.load(source, device="cpu", dtype=dtype or load_dtype(source, settings), context_length=1)
        spec = lm.spec
        if settings.quantize_lm_head and spec.text.tie_word_embeddings:
            raise ConfigError("--quantize-lm-head: this model ties its lm_head to the embeddings, which stay fp16")
        quantized = quantize_model(lm, settings, calibration, samples, progress)
        del lm  # the fp32 model is not needed for writing
        meta = {"max_damp_used": quantized.max_damp} if settings.method == "gptq" else {}
        if settings.method == "gptq":
            meta["calibration"] = {"samples": quantized.samples,
                                   "source": "synthetic" if calibration is None else "folder"}
        qconfig = quantization_config(settings, block_name(spec), quantized.groups, meta)
        write_gptq_folder(tmp, source, spec, quantized.results, qconfig, shard_bytes)
        write_manifest(tmp, {"family": spec.family, "template": spec.template,
                             "image_tokens": spec.vision.num_image_tokens, "source": source.name,
                             "exporter": f"edgelmm {__version__}",
                             "quantization": {**settings.as_dict(), "quantized_modules": sorted(quantized.results),
                                              "skipped_modules": quantized.skipped}})
    report = ExportReport(out, time.perf_counter() - start, peak_rss_bytes(), len(quantized.results), quantized.skipped)
    print(report.summary(), file=sys.stderr)
    return report
