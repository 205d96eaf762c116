"""``edgelmm bench`` (also ``benchmarks/latency.py``): image preprocess, vision encode, prefill (TTFT), decode
tok/s, peak memory and effective bandwidth of edgelmm's backends and of peer runtimes, side by side::

    edgelmm bench MODEL --image cat.jpg --prompt-tokens 800 --new-tokens 128 --json out.json --plot out.png
    edgelmm bench --shape tinyllava-phi2-siglip-3.1b --backends torch,gptq4,onnx4 --peers transformers,llama.cpp

MODEL is a checkpoint folder, an edgelmm export (GPTQ or ONNX, run as is) or a TinyGPT-V description .json;
``--shape NAME`` builds a full-size random-weight model of a released architecture once into the cache
(edgelmm.bench.models). Backends ``gptq4``/``onnx4`` export the checkpoint once into the cache (RTN by
default: the same packed layout and speed as GPTQ); ``onnx4-lm`` runs that ONNX export's language model alone
(embedding and decoder graphs, the peers' text prompt), as the peers run theirs. Each system runs in its own process (edgelmm.bench.worker):
one warm-up, then ``--runs`` timed generations of exactly ``--new-tokens`` greedy tokens. The prompt is one
image plus text padded with real tokens to ``--prompt-tokens`` (image + text). Peers that run the language
model alone get an equal-length prompt of text token ids (scope "language-model-only").

JSON (``--json``), schema "edgelmm.bench/1"; durations in s, rates per s, sizes in bytes; a STAT is
``{"median", "min", "max"}`` over the runs, or null when a system has no such phase::

    {"schema": "edgelmm.bench/1", "created_utc": str, "command": [str],
     "machine": {"device": "cpu"|"cuda", "platform", "python",
                 "cpu": {"model", "arch", "flags": {"avx2": bool, "avx512f", "avx512_bf16", "avx512_vnni",
                         "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve"}, "amx": bool},
                 "logical_cpus": int, "usable_cpus": int, "threads": int, "ram_total_bytes": int,
                 "gpu": null | {"name", "total_memory_bytes", "spec_bandwidth_bytes_per_s"},
                 "jetson": {"is_jetson": bool, "module", "nvpmodel_mode", "jetson_clocks": "on"|"off"|"unknown"|"n/a"},
                 "host_copy_bandwidth_bytes_per_s": float, "memory_bandwidth_bytes_per_s": float,
                 "memory_bandwidth_method": str, "libraries": {name: version | null},
                 "host_copy_bandwidth_after_bytes_per_s": float},  # measured again once every system has run
     "workload": {"model": str, "shape": str | null, "image": str, "prompt_tokens": int, "image_tokens": int,
                  "text_tokens": int, "new_tokens": int, "runs": int, "warmup_runs": int, "dtype": str},
     "systems": [{"name": str, "kind": "backend"|"peer", "status": "ok"|"skipped"|"failed",
                  "reason": str | null, "model_path": str | null,
                  # when status is "ok":
                  "scope": "vlm"|"language-model-only", "weights": str, "prompt_tokens": int,
                  "new_tokens": int, "runs": int, "load_s": float, "preprocess_s": STAT, "vision_s": STAT,
                  "prefill_s": STAT, "ttft_s": STAT, "decode_s": STAT, "decode_tok_per_s": STAT,
                  "prefill_tok_per_s": STAT, "peak_rss_bytes": int, "cuda_max_allocated_bytes": int | null,
                  "torch_loaded": bool,  # whether torch was in the system's process (only systems that run on it)
                  "weight_bytes_per_token": int, "rss_over_weights": float, "kv_bytes_per_token": int,
                  "effective_bandwidth_bytes_per_s": float, "bandwidth_utilization_pct": float | null,
                  "notes": [str]}],
     "plot": str | null, "plot_note": str | null}

``ttft_s`` = preprocess + vision + prefill. ``decode_tok_per_s`` = (new_tokens - 1) decode steps / decode_s.
``weight_bytes_per_token`` = weights one decode step reads (the LM without its embedding table, of which one
row is read, unless tied to the LM head); ``kv_bytes_per_token`` = K+V bytes of all layers at the mean
context while decoding (prompt + new_tokens / 2). ``effective_bandwidth_bytes_per_s`` = (weight + KV bytes)
x median tok/s; ``bandwidth_utilization_pct`` relates it to ``memory_bandwidth_bytes_per_s`` (measured by a
host copy on CPU; the device specification on a GPU). ``peak_rss_bytes`` is the system's process peak RSS;
``rss_over_weights`` = peak_rss_bytes / weight_bytes_per_token."""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BACKENDS = ("torch", "gptq4", "onnx4", "onnx4-lm", "bnb-nf4", "bnb-fp4", "bnb-int8")
_EXPORT_OF = {"torch": None, "gptq4": "gptq4", "onnx4": "onnx4", "onnx4-lm": "onnx4"}  # the export a backend runs
_BNB = {"bnb-nf4": "nf4", "bnb-fp4": "fp4", "bnb-int8": "int8"}  # torch backend, quantized by bitsandbytes at load
PEERS = ("transformers", "llama.cpp", "ort-genai")
PEER_MODULES = {"transformers": ("transformers", "pip install transformers"),
                "llama.cpp": ("llama_cpp", "pip install llama-cpp-python gguf"),
                "ort-genai": ("onnxruntime_genai", "pip install onnxruntime-genai onnx-ir")}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", nargs="?", help="checkpoint folder, edgelmm export, or TinyGPT-V description .json")
    p.add_argument("--shape", help="build a full-size random-weight model: tiny, tinyllava-phi2-siglip-3.1b, "
                                   "mipha-3b, llava-gemma-2b, tiny-llava-1.1b, tinygpt-v")
    p.add_argument("--image", help="image file (default: a synthetic 640x480 picture)")
    p.add_argument("--prompt-tokens", type=int, default=800, help="image tokens + text tokens (default 800)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="timed runs per system (after one warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backends", default="torch,gptq4,onnx4", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--quantize", choices=tuple(_BNB.values()), action="append", default=[],
                   help="add the torch backend quantized by bitsandbytes at load (= --backends ...,bnb-M); repeatable")
    p.add_argument("--peers", default="transformers,llama.cpp,ort-genai",
                   help=f"comma list of {', '.join(PEERS)}, or none")
    p.add_argument("--gguf", default="Q4_0,Q8_0", help="llama.cpp quantizations (Q4_0, Q8_0)")
    p.add_argument("--dtype", default=None, help="torch backend and transformers dtype: fp32 (CPU default), bf16, fp16")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="threads for every system (default: usable CPUs)")
    p.add_argument("--quant-method", choices=("rtn", "gptq"), default="rtn", help="for the gptq4/onnx4 exports")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group of the exports (default 128; 32 for --shape tiny, whose widths 128 "
                        "does not divide)")
    p.add_argument("--cache-dir", help="where shapes, exports and peer models go ($EDGELMM_CACHE, ~/.cache/edgelmm)")
    p.add_argument("--bandwidth-mib", type=int, default=512, help="buffer size of the memory-bandwidth copy")
    p.add_argument("--timeout", type=float, default=None, help="seconds per system before it counts as failed")
    p.add_argument("--json", dest="json_path", help="write the report here")
    p.add_argument("--plot", help="write the PNG chart here (needs matplotlib)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="edgelmm bench", description=__doc__.split("\n\n")[0],
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


def _image(path: str | None, root: Path) -> str:
    if path:
        return str(Path(path).expanduser())
    import numpy as np
    from PIL import Image

    out = root / "bench-image.png"
    if not out.is_file():
        y, x = np.mgrid[0:480, 0:640]
        pixels = np.stack([x * 255 // 640, y * 255 // 480, (x // 8 + y // 8) % 2 * 255], axis=-1).astype(np.uint8)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out)
    return str(out)


def _prompts(source: Path, prompt_tokens: int) -> tuple[list[int], list[int], int]:
    """The VLM prompt ids (as edgelmm builds them), the equal-length text-only ids, and the image tokens."""
    from types import SimpleNamespace

    from edgelmm.api import EdgeLMM
    from edgelmm.bench.prompt import bench_prompt, text_only
    from edgelmm.checkpoint.json_file import read_json
    from edgelmm.checkpoint.loader import WeightFiles
    from edgelmm.families import detect
    from edgelmm.processing.tokenizer import Tokenizer

    spec = detect(read_json(source / "config.json"), source, WeightFiles(source).keys())
    lm = EdgeLMM(SimpleNamespace(spec=spec), Tokenizer.from_dir(source), source)
    ids = bench_prompt(lm, prompt_tokens)
    return ids, text_only(ids, set(spec.image_ids), lm.tokenizer), spec.vision.num_image_tokens


def _run_job(job: dict, timeout: float | None) -> dict:
    """Run one system in a child process; its raw result, or the failure (exit code, stderr's tail)."""
    with tempfile.TemporaryDirectory(prefix="edgelmm-bench-") as tmp:
        job = {**job, "result": str(Path(tmp) / "result.json")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        try:
            proc = subprocess.run([sys.executable, "-m", "edgelmm.bench.worker", str(Path(tmp) / "job.json")],
                                  check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
        result = Path(job["result"])
        if result.is_file():
            return json.loads(result.read_text())
        return {"status": "failed", "reason": f"process exited with {proc.returncode}: {proc.stderr.strip()[-400:]}"}


def _plan(args, source: Path, kind: str, root: Path, base: dict) -> list[tuple[str, str, dict | None, dict | None]]:
    """(name, kind, job, skip) per system; ``skip`` is a raw result (status skipped/failed) when not runnable."""
    from edgelmm.bench.models import export_folder, exporter_missing, hf_language_model
    from edgelmm.errors import EdgeLMMError

    plan = []
    backends = [b for b in args.backends.split(",") if b and b != "none"]
    backends += [f"bnb-{m}" for m in args.quantize if f"bnb-{m}" not in backends]
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    for name in [*backends, *peers]:
        if name not in (*BACKENDS, *PEERS):
            raise SystemExit(f"edgelmm bench: unknown backend or peer {name!r}; choose from {BACKENDS + PEERS}")
    if kind in ("gptq", "onnx"):  # an export runs as it is
        plan.append((f"edgelmm-{kind}", "backend", {**base, "system": "edgelmm", "model": str(source), "export": kind},
                     None))
    for backend in backends:
        name = f"edgelmm-{backend}"
        if backend in _BNB:
            plan.append((name, "backend", *_bnb_job(_BNB[backend], source, kind, base)))
            continue
        if kind == "tinygpt-v" and backend == "torch":
            plan.append((name, "backend", {**base, "system": "edgelmm", "model": str(source), "export": None}, None))
            continue
        if backend == "onnx4-lm" and kind != "checkpoint":
            plan.append((name, "backend", None, {"status": "skipped", "reason": "the language model alone runs the "
                         "peers' text prompt, made from a checkpoint folder's tokenizer"}))
            continue
        if kind == "tinygpt-v" and backend != "onnx4":
            plan.append((name, "backend", None, {"status": "skipped", "reason": "TinyGPT-V exports to ONNX only "
                         "(its released pieces have no checkpoint layout a GPTQ loader reads)"}))
            continue
        if kind not in ("checkpoint", "tinygpt-v"):
            plan.append((name, "backend", None, {"status": "skipped", "reason": f"the model is a {kind} source "
                         f"(run as it is); {backend} is exported from an unquantized checkpoint folder"}))
            continue
        missing = exporter_missing(_EXPORT_OF[backend]) if backend != "torch" else None
        if missing:
            plan.append((name, "backend", None, {"status": "skipped", "reason": f"exporter unavailable: {missing}"}))
            continue
        try:
            model = source if backend == "torch" else export_folder(_EXPORT_OF[backend], source, root,
                                                                    args.quant_method, args.group_size)
        except EdgeLMMError as e:
            plan.append((name, "backend", None, {"status": "failed", "reason": str(e)}))
            continue
        export = {None: None, "gptq4": "gptq", "onnx4": "onnx"}[_EXPORT_OF[backend]]
        notes = [] if export is None else [(f"exported once with `edgelmm export --format {export} --bits 4 --method "
                                            f"{args.quant_method} --group-size {args.group_size}`")]
        plan.append((name, "backend", {**base, "system": "edgelmm", "model": str(model), "export": export,
                                       "lm_only": backend == "onnx4-lm", "notes": notes}, None))
    for peer in peers:
        module, install = PEER_MODULES[peer]
        names = [f"llama.cpp-{q}" for q in args.gguf.split(",")] if peer == "llama.cpp" else [peer]
        reason = None
        if importlib.util.find_spec(module) is None:
            reason = f"{module} is not installed ({install})"
        elif kind != "checkpoint":
            reason = (f"peers run an unquantized checkpoint folder, not a {kind} source" if kind != "tinygpt-v" else
                      "TinyGPT-V's Phi-2 (QK and post-attention norms) has no HF, GGUF or genai equivalent")
        if reason:
            plan.extend((n, "peer", None, {"status": "skipped", "reason": reason}) for n in names)
            continue
        try:
            plan.extend(_peer_jobs(peer, names, source, root, base, hf_language_model))
        except (EdgeLMMError, OSError, ValueError, RuntimeError) as e:
            plan.extend((n, "peer", None, {"status": "failed", "reason": f"{type(e).__name__}: {e}"}) for n in names)
    return plan


def _bnb_job(method: str, source: Path, kind: str, base: dict) -> tuple[dict | None, dict | None]:
    """(job, skip) of the torch backend loading ``source`` with ``quantize=method`` (bitsandbytes)."""
    if kind not in ("checkpoint", "tinygpt-v"):
        return None, {"status": "skipped", "reason": f"the model is a {kind} source (run as it is); bitsandbytes "
                      "quantizes an unquantized checkpoint folder as it loads"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return None, {"status": "skipped", "reason": "bitsandbytes is not installed (pip install edgelmm[bnb])"}
    return {**base, "system": "edgelmm", "model": str(source), "export": None, "quantize": method,
            "notes": [f"EdgeLMM.load(quantize={method!r}): bitsandbytes layers, quantized while loading"]}, None


def _peer_jobs(peer: str, names: list[str], source: Path, root: Path, base: dict, hf_language_model):
    from edgelmm.bench.models import peer_model

    cfg = json.loads((source / "config.json").read_text())
    llava = (cfg.get("architectures") or [""])[0] == "LlavaForConditionalGeneration"
    hf = ["transformers: one forward per token over a StaticCache, greedy argmax"]
    if peer == "transformers" and llava:
        return [(peer, "peer", {**base, "system": peer, "peer_model": str(source), "hf_vlm": True,
                                "notes": hf + ["LlavaForConditionalGeneration with its own image processor"]}, None)]
    lm = hf_language_model(source, root)
    if peer == "transformers":
        return [(peer, "peer", {**base, "system": peer, "peer_model": str(lm), "notes": hf}, None)]
    notes = {"llama.cpp": ["GGUF by edgelmm.bench.gguf: output.weight Q8_0, norms F32, F16 KV cache, n_batch 512"],
             "ort-genai": ["built by onnxruntime_genai.models.builder -p int4 -e cpu"]}[peer]
    return [(n, "peer", {**base, "system": peer, "qtype": n.rpartition("-")[2], "notes": notes,
                         "peer_model": str(peer_model(peer, lm, root, n.rpartition("-")[2]))}, None) for n in names]


def run(args) -> dict:
    """Benchmark as ``args`` says; print the header and table; write the JSON and chart; return the report."""
    from edgelmm.bench.machine import machine_info, measure_bandwidth, usable_cpus
    from edgelmm.bench.models import shape_folder, source_kind
    from edgelmm.bench.report import header, plot, system_record, table, write_json
    from edgelmm.paths import cache_root

    if bool(args.model) == bool(args.shape):
        raise SystemExit("edgelmm bench: pass a MODEL folder or --shape NAME (one of them)")
    root = cache_root(args.cache_dir)
    source = shape_folder(args.shape, root) if args.shape else Path(args.model).expanduser()
    kind = source_kind(source)
    threads = args.threads or usable_cpus()
    args.group_size = args.group_size or (32 if args.shape == "tiny" else 128)
    machine = machine_info(threads, args.bandwidth_mib * 2**20)
    image = _image(args.image, root)
    vlm_ids, text_ids, image_tokens = _prompts(source, args.prompt_tokens) if kind == "checkpoint" else ([], [], None)
    base = {"image": image, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
            "warmup": args.warmup, "threads": threads, "dtype": args.dtype, "device": args.device,
            "vlm_prompt_ids": vlm_ids, "text_prompt_ids": text_ids}
    workload = {"model": str(source), "shape": args.shape, "image": image, "prompt_tokens": args.prompt_tokens,
                "image_tokens": image_tokens, "text_tokens": None if image_tokens is None else
                args.prompt_tokens - image_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
                "warmup_runs": args.warmup, "dtype": args.dtype or "runtime default (fp32 on CPU, fp16 on CUDA)"}
    report = {"schema": "edgelmm.bench/1", "created_utc": datetime.datetime.now(datetime.UTC).isoformat(),
              "command": sys.argv, "machine": machine, "workload": workload, "systems": []}
    print(header(report), flush=True)
    for name, system_kind, job, skip in _plan(args, source, kind, root, base):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        raw = skip or _run_job(job, args.timeout)
        report["systems"].append(system_record(name, system_kind, job, raw, machine["memory_bandwidth_bytes_per_s"]))
    print(table(report["systems"]))
    after, _ = measure_bandwidth(args.bandwidth_mib * 2**20, threads=threads)  # a shared host drifts: check again
    machine["host_copy_bandwidth_after_bytes_per_s"] = after
    print(f"memory bandwidth after the runs: {after / 1e9:.1f} GB/s "
          f"(before: {machine['host_copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
    report["plot"], report["plot_note"] = None, None
    if args.plot:
        report["plot_note"] = plot(report, Path(args.plot))
        report["plot"] = None if report["plot_note"] else str(args.plot)
        print(report["plot_note"] or f"chart: {args.plot}")
    if args.json_path:
        write_json(report, Path(args.json_path))
        print(f"report: {args.json_path}")
    return report


def main(argv: list[str] | None = None) -> int:
    from edgelmm.errors import EdgeLMMError

    try:
        run(build_parser().parse_args(argv))
    except EdgeLMMError as e:
        print(f"edgelmm bench: error: {e}", file=sys.stderr)
        return 2
    return 0
