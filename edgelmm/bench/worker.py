"""One benchmarked system, run in its own process (``python -m edgelmm.bench.worker JOB.json``) so its peak RSS is
its own and a crashing peer cannot take the benchmark down: load, warm up, time ``runs`` generations, and
write the raw per-run timings and the bytes each decoded token reads to the job's ``result`` path.

Every system decodes exactly ``new_tokens`` tokens greedily, ignoring end-of-sequence: the prefill gives
the first token, ``new_tokens - 1`` decode steps the rest. Also the prompt builder shared with the parent."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

QUESTION = "What is in the picture? Describe it in detail."
FILLER = ("The photograph was taken on a bright afternoon in a small harbour town. Fishing boats rest against the "
          "stone quay, gulls circle above the masts, and a few people walk along the water with bags of bread and "
          "fruit from the market. Behind them, painted houses climb the hill towards an old church. ")

_ORT_ELEMENT_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(int8)": 1}


def image_ids(spec) -> set[int]:
    from edgelmm.spec import IMAGE_PLACEHOLDER

    return {IMAGE_PLACEHOLDER} | ({spec.image_token_id} if getattr(spec, "image_token_id", None) is not None else set())


def filler_ids(tokenizer, n: int) -> list[int]:
    """``n`` real text token ids: the tokenized FILLER prose, repeated as needed."""
    ids = tokenizer.encode(FILLER, add_bos=False)
    return (ids * (n // len(ids) + 1))[:n]


def bench_prompt(lm, prompt_tokens: int) -> list[int]:
    """The prompt ids of QUESTION about one image, text padded with FILLER tokens (inserted right after the
    image) so that image tokens + text = ``prompt_tokens`` exactly. When the templated prompt is already
    longer (a random-weight shape's tiny tokenizer splits the system prompt finely), tokens of the system
    prompt before the image are dropped instead (the first token, e.g. BOS, is kept)."""
    from edgelmm.errors import ConfigError

    _, ids = lm.prompt_ids(QUESTION)
    marks = image_ids(lm.spec)
    first = min((i for i, t in enumerate(ids) if t in marks), default=len(ids))
    last = max((i for i, t in enumerate(ids) if t in marks), default=0) + 1
    need = prompt_tokens - len(ids)
    if need < 0 and first - 1 >= -need:
        return ids[:1] + ids[1 - need:]
    if need < 0:
        raise ConfigError(f"--prompt-tokens {prompt_tokens} is below this model's image tokens plus the question "
                          f"({len(ids) - first + 1}); use at least that")
    return ids[:last] + filler_ids(lm.tokenizer, need) + ids[last:]


def text_only(ids: list[int], marks: set[int], tokenizer) -> list[int]:
    """The same-length prompt for a language model alone: image positions become FILLER tokens."""
    fill = iter(filler_ids(tokenizer, len(ids)))
    return [next(fill) if t in marks else t for t in ids]


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
                                   context_length=context)
            self.ids, self.backend = bench_prompt(self.lm, job["prompt_tokens"]), self.lm.backend
        backend, t = self.backend, self.backend.spec.text
        if onnx:
            cfg = backend.config
            self.weight_bytes = onnx_decode_bytes(cfg.decoder)
            cache = backend.decoder.kv[0][0]  # fp32, fp16, or int8 rows with their scale: [1, Hkv, L, row]
            row_bytes = cache.shape()[-1] * _ORT_ELEMENT_BYTES[cache.data_type()]
            self.weights = f"onnx {cfg.quantization.get('bits', 16)}-bit" if cfg.quantization else "onnx fp"
            self.weights += " (edgelmm ops)" if backend.decoder_kernels == "edgelmm" else ""
        else:
            self.weight_bytes = torch_decode_bytes(backend.model.text)
            row_bytes = t.head_dim * backend.cache.data.element_size()
            gptq = json.loads((Path(job["model"]) / "config.json").read_text()).get("quantization_config") \
                if Path(job["model"], "config.json").is_file() else None
            self.weights = (f"gptq {gptq['bits']}-bit g{gptq['group_size']}" if gptq else str(backend.dtype)[6:])
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
    from edgelmm.bench.machine import peak_rss_bytes

    os.environ.setdefault("EDGELMM_THREADS", str(job["threads"]))
    if uses_torch(job):  # only then: importing torch alone adds ~0.3 GB to a process's peak RSS
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
