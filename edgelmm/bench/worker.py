"""One benchmarked system, run in its own process (``python -m edgelmm.bench.worker JOB.json``) so its peak RSS is
its own and a crashing peer cannot take the benchmark down: load, warm up, time ``runs`` generations, and
write the raw per-run timings and the bytes each decoded token reads to the job's ``result`` path.

Every system decodes exactly ``new_tokens`` tokens greedily, ignoring end-of-sequence: the prefill gives
the first token, ``new_tokens - 1`` decode steps the rest."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from edgelmm.bench.prompt import QUESTION, bench_prompt
from edgelmm.bench.weights import onnx_decode_bytes, torch_decode_bytes

ORT_ELEMENT_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(int8)": 1}


class EdgeSession:
    """An edgelmm backend (torch, a GPTQ export, or an ONNX export on onnxruntime) through EdgeLMM.load; with
    ``lm_only``, an ONNX export's language model alone (no vision graph), fed the peers' text prompt."""

    def __init__(self, job: dict):
        self.job, self.lm_only = job, job.get("lm_only", False)
        self.scope = "language-model-only" if self.lm_only else "vlm"

    def load(self) -> None:
        from edgelmm.api import EdgeLMM

        job = self.job
        context = job["prompt_tokens"] + job["new_tokens"] + 16
        onnx = job.get("export") == "onnx"
        if self.lm_only:
            from edgelmm.backends.onnx.backend import OnnxBackend

            self.lm, self.ids = None, job["text_prompt_ids"]
            self.backend = OnnxBackend.load(Path(job["model"]), job["device"], context, vision=False)
        else:
            self.lm = EdgeLMM.load(job["model"], device=job["device"], dtype=None if onnx else job["dtype"],
                                   context_length=context, quantize=job.get("quantize"))
            self.ids, self.backend = bench_prompt(self.lm, job["prompt_tokens"]), self.lm.backend
        backend, t = self.backend, self.backend.spec.text
        if onnx:
            cfg = backend.config
            self.weight_bytes = onnx_decode_bytes(cfg.decoder)
            cache = backend.decoder.kv[0][0]  # fp32, fp16, or int8 rows with their scale: [1, Hkv, L, row]
            row_bytes = cache.shape()[-1] * ORT_ELEMENT_BYTES[cache.data_type()]
            self.weights = f"onnx {cfg.quantization.get('bits', 16)}-bit" if cfg.quantization else "onnx fp"
            self.weights += " (edgelmm ops)" if backend.decoder_kernels == "edgelmm" else ""
        else:
            self.weight_bytes = torch_decode_bytes(backend.model.text)
            row_bytes = t.head_dim * backend.cache.data.element_size()
            gptq = json.loads((Path(job["model"]) / "config.json").read_text()).get("quantization_config") \
                if Path(job["model"], "config.json").is_file() else None
            self.weights = (f"gptq {gptq['bits']}-bit g{gptq['group_size']}" if gptq else
                            f"bnb {job['quantize']}" if job.get("quantize") else str(backend.dtype)[6:])
        self.kv_bytes_per_position = 2 * t.num_layers * t.num_kv_heads * row_bytes

    def run(self, new_tokens: int) -> dict:
        lm, backend = self.lm, self.backend
        preprocess_s = vision_s = features = None
        if not self.lm_only:
            t0 = time.perf_counter()
            pixels = lm.pixels(self.job["image"])
            lm.prompt_ids(QUESTION)  # tokenizing and templating is part of preprocessing
            t1 = time.perf_counter()
            features = backend.encode_image(pixels)
            preprocess_s, vision_s = t1 - t0, time.perf_counter() - t1
        t2 = time.perf_counter()
        token = int(np.argmax(backend.prefill(self.ids, features)))
        t3 = time.perf_counter()
        for position in range(len(self.ids), len(self.ids) + new_tokens - 1):
            token = int(np.argmax(backend.decode(token, position)))
        return {"preprocess_s": preprocess_s, "vision_s": vision_s, "prefill_s": t3 - t2,
                "decode_s": time.perf_counter() - t3, "decode_steps": new_tokens - 1}


def uses_torch(job: dict) -> bool:
    """Whether the system runs on torch: transformers, and edgelmm's torch and GPTQ backends."""
    return job["system"] == "transformers" or (job["system"] == "edgelmm" and job.get("export") != "onnx")


def make_session(job: dict):
    if job["system"] == "edgelmm":
        return EdgeSession(job)
    from edgelmm.bench.peers import PEERS

    return PEERS[job["system"]](job)


def measure(job: dict) -> dict:
    """Load, warm up, run; the raw result (bench.py turns runs into statistics)."""
    from edgelmm.process_memory import peak_rss_bytes

    os.environ.setdefault("EDGELMM_THREADS", str(job["threads"]))
    if uses_torch(job):  # only then: importing torch alone raises a process's peak RSS
        import torch

        torch.set_num_threads(job["threads"])
    session = make_session(job)
    t = time.perf_counter()
    session.load()
    load_s = time.perf_counter() - t
    for _ in range(job["warmup"]):
        session.run(min(job["new_tokens"], 8))
    runs = [session.run(job["new_tokens"]) for _ in range(job["runs"])]
    cuda = None
    if job["device"] not in (None, "cpu") and "torch" in sys.modules:
        import torch

        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"status": "ok", "load_s": load_s, "runs": runs, "scope": session.scope, "weights": session.weights,
            "prompt_tokens": len(session.ids), "weight_bytes_per_token": session.weight_bytes,
            "kv_bytes_per_position": session.kv_bytes_per_position, "peak_rss_bytes": peak_rss_bytes(),
            "torch_loaded": "torch" in sys.modules,
            "cuda_max_allocated_bytes": cuda, "notes": getattr(session, "notes", [])}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = measure(job)
    except Exception as e:  # noqa: BLE001 -- any error is this system's failure, reported with its reason
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
