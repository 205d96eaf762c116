"""Decode speed of edgelmm's ONNX decoder graph on random weights, with an onnxruntime per-op profile.

    python benchmarks/onnx_decode.py --shape phi2      # full-size Phi-2 LM, 4-bit, 800-token prompt, 128 new
    python benchmarks/onnx_decode.py --shape tiny      # seconds; what the tests run

The decoder is the exporter's own graph (export/onnx_decoder.py) built from random quantized weights made
directly in MatMulNBits layout (random 4/8-bit codes and scales), so no fp32 model is ever materialized;
it is built in a child process and cached in ``--model-dir``, so the measuring process holds only
onnxruntime's copy. The run feeds random ``inputs_embeds``: a ``--prompt-tokens`` prefill (TTFT), then
``--new-tokens`` greedy steps through the same preallocated, shared past/present KV buffers the runtime uses.

Reports decode tok/s, TTFT, peak RSS (this process), the weights' bytes, a memory-copy bandwidth check
before and after (in a child process), and (unless ``--no-profile``) a per-op-type profile of one prefill and 16 decode steps from
a second session with ``enable_profiling``. Knobs: ``--bits``, ``--block-size``, ``--accuracy-level`` (4 =
int8 compute), ``--lm-head-bits``, ``--threads``. The session is the runtime's own (``decoder_session``): 4-bit
int8-compute linears run on edgelmm's op where it is available; ``EDGELMM_ORT_OPS=0`` measures onnxruntime's kernel.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

SHAPES = {"tiny": "tiny", "phi2": "full"}
PROFILE_STEPS = 16


def text_config(shape: str, layers: int | None = None):
    from edgelmm.config import TextConfig
    from edgelmm.synthetic.shapes import FULL, TINY

    cfg = {"vocab_size": 512, **(FULL if SHAPES[shape] == "full" else TINY)["phi"]}
    return TextConfig.from_hf({**cfg, **({"num_hidden_layers": layers} if layers else {})}, "phi")


def _random_linear(rng, k: int, n: int, bits: int, block: int, bias: bool):
    from edgelmm.export.onnx_graph import Linear, NBits

    k_blocks = -(-k // block)
    codes = rng.integers(0, 256, (n, k_blocks, block * bits // 8), dtype=np.uint8)
    code_std = 2 ** bits / 12 ** 0.5  # uniform codes around the default zero point
    scales = np.full((n, k_blocks), 1 / (code_std * k ** 0.5), np.float32)
    b = rng.standard_normal(n).astype(np.float32) * 0.02 if bias else None
    return Linear(k, n, nbits=NBits(codes, scales, None, bits, block), bias=b)


def build(path: str, shape: str, layers: int | None, bits: int, block: int, lm_head_bits: int,
          accuracy_level: int) -> None:
    """Write the random-weight decoder graph of ``shape`` to ``path`` (run in a child process)."""
    from edgelmm.export.onnx_decoder import build_decoder
    from edgelmm.export.onnx_graph import save_model

    cfg, rng = text_config(shape, layers), np.random.default_rng(0)
    d, f, qkv = cfg.hidden_size, cfg.intermediate_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    linears, norms = {}, {}
    for i in range(cfg.num_layers):
        linears[f"layers.{i}.qkv"] = _random_linear(rng, d, qkv, bits, block, True)
        linears[f"layers.{i}.o"] = _random_linear(rng, d, d, bits, block, True)
        linears[f"layers.{i}.up"] = _random_linear(rng, d, f, bits, block, True)
        linears[f"layers.{i}.down"] = _random_linear(rng, f, d, bits, block, True)
        norms[f"layers.{i}.input_layernorm.weight"] = np.ones(d, np.float32)
        norms[f"layers.{i}.input_layernorm.bias"] = np.zeros(d, np.float32)
    linears["lm_head"] = _random_linear(rng, d, cfg.vocab_size, lm_head_bits, block, True)
    norms["final_norm.weight"], norms["final_norm.bias"] = np.ones(d, np.float32), np.zeros(d, np.float32)
    save_model(build_decoder(cfg, linears, norms, "float32", accuracy_level), Path(path))


def run(session, cfg, prompt: int, new: int, context: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for ``new`` tokens) through a KVDecoder."""
    from edgelmm.backends.onnx.backend import KVDecoder
    from edgelmm.backends.onnx.config import prefill_chunk

    rng = np.random.default_rng(1)
    dec = KVDecoder(session, cfg, np.float32, context, chunk=prefill_chunk())
    embeds = rng.standard_normal((1, prompt, cfg.hidden_size), dtype=np.float32)
    t0 = time.perf_counter()
    logits = dec.prefill(prompt, lambda start, end: embeds[:, start:end])
    t1 = time.perf_counter()
    table = rng.standard_normal((64, cfg.hidden_size)).astype(np.float32)  # stand-in token embeddings
    for i in range(new):
        dec.run(table[None, int(np.argmax(logits)) % 64][:, None], prompt + i + 1)
    return t1 - t0, time.perf_counter() - t1


def profile_summary(path: str, skip: int, prefill_runs: int = 1, top: int = 12) -> dict:
    """Per-op-type milliseconds in the ``prefill_runs`` model runs after ``skip`` warm-up runs (the prefill, in
    chunks when ``EDGELMM_PREFILL_CHUNK`` splits it) and the later ones (decode, per step)."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    warm_end = runs[skip - 1][1] if skip else -1
    runs = runs[skip:]
    totals = {"prefill": defaultdict(float), "decode": defaultdict(float)}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] <= warm_end:
            continue
        phase = "prefill" if runs and e["ts"] < runs[min(prefill_runs, len(runs)) - 1][1] else "decode"
        totals[phase][e["args"].get("op_name", "?")] += e["dur"] / 1000
    steps = max(len(runs) - prefill_runs, 1)
    out = {}
    for phase, ops in totals.items():
        scale = 1 / steps if phase == "decode" else 1
        total = sum(ops.values()) * scale
        rows = sorted(((op, ms * scale) for op, ms in ops.items()), key=lambda r: -r[1])[:top]
        out[phase] = {"total_ms": round(total, 3),
                      "ops": [f"{op}: {ms:.3f} ms ({100 * ms / max(total, 1e-9):.1f}%)" for op, ms in rows]}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="phi2")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--block-size", type=int, choices=(32, 64, 128), default=32)
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4)
    p.add_argument("--lm-head-bits", type=int, choices=(4, 8), default=8)
    p.add_argument("--prompt-tokens", type=int, default=800)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="override the decoder depth (partial-size runs)")
    p.add_argument("--model-dir", default=None, help="where the built graph is cached (default: a temp dir)")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)

    from edgelmm.backends.onnx import ops as ort_ops
    from edgelmm.backends.onnx.backend import decoder_session
    from edgelmm.backends.onnx.config import chunk_bounds, prefill_chunk
    from edgelmm.bench.machine import measure_bandwidth
    from edgelmm.process_memory import peak_rss_bytes

    folder = Path(args.model_dir or tempfile.mkdtemp(prefix="edgelmm-onnx-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    name = f"decoder-{args.shape}-l{args.layers}-b{args.bits}-g{args.block_size}-a{args.accuracy_level}-h{args.lm_head_bits}.onnx"
    path = folder / name
    if not path.exists():
        child = multiprocessing.get_context("spawn").Process(target=build, args=(
            str(path), args.shape, args.layers, args.bits, args.block_size, args.lm_head_bits, args.accuracy_level))
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"building the decoder failed (exit {child.exitcode})")
    cfg = text_config(args.shape, args.layers)
    weights = sum(f.stat().st_size for f in folder.glob(name + "*"))
    context = args.prompt_tokens + max(args.new_tokens, PROFILE_STEPS)
    copy_bytes = 1 << (29 if args.shape == "phi2" else 24)
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # its arrays stay out of this process's RSS
        bw_before = pool.apply(measure_bandwidth, (copy_bytes, 3, args.threads))[0] / 1e9
    session, edgelmm_ops = decoder_session(path, ["CPUExecutionProvider"], args.threads,
                                           edgelmm_ops=ort_ops.applies("cpu", "float32"))
    run(session, cfg, 8, 2, context)  # warm-up
    prefill_s, decode_s = run(session, cfg, args.prompt_tokens, args.new_tokens, context)
    peak = peak_rss_bytes()
    del session
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        bw_after = pool.apply(measure_bandwidth, (copy_bytes, 3, args.threads))[0] / 1e9
    result = {"shape": args.shape, "bits": args.bits, "block_size": args.block_size,
              "accuracy_level": args.accuracy_level, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "edgelmm_ops": edgelmm_ops, "ttft_s": round(prefill_s, 3),
              "decode_tok_s": round(args.new_tokens / decode_s, 2), "peak_rss_gb": round(peak / 1e9, 3),
              "weights_gb": round(weights / 1e9, 3), "rss_over_weights": round(peak / weights, 2),
              "bandwidth_gbs_before": round(bw_before, 1), "bandwidth_gbs_after": round(bw_after, 1)}
    if not args.no_profile:
        session, _ = decoder_session(path, ["CPUExecutionProvider"], args.threads, str(folder / "profile"), edgelmm_ops)
        run(session, cfg, 8, 2, context)  # warm-up: 3 model runs, left out of the summary
        run(session, cfg, args.prompt_tokens, PROFILE_STEPS, context)
        chunks = len(chunk_bounds(args.prompt_tokens, prefill_chunk()))
        result["profile"] = profile_summary(session.end_profiling(), skip=3, prefill_runs=chunks)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
