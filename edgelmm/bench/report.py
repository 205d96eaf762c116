"""The benchmark's results: per-system statistics and effective bandwidth from the raw runs, the printed
header and table, the JSON file (schema in edgelmm.bench.command) and the PNG chart (matplotlib, when installed)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

PHASES = ("preprocess_s", "vision_s", "prefill_s")


def stat(values: list[float | None]) -> dict | None:
    """{"median", "min", "max"} of the values (None when a system has no such phase)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def system_record(name: str, kind: str, job: dict | None, raw: dict, bandwidth: float) -> dict:
    """One ``systems`` entry of the report from a worker's raw result (or a skip/failure)."""
    record = {"name": name, "kind": kind, "status": raw["status"], "reason": raw.get("reason"),
              "model_path": (job or {}).get("peer_model") or (job or {}).get("model")}
    if raw["status"] != "ok":
        return record
    runs, new = raw["runs"], job["new_tokens"]
    rates = [r["decode_steps"] / r["decode_s"] for r in runs if r["decode_s"] > 0]
    kv = raw["kv_bytes_per_position"] * (raw["prompt_tokens"] + new / 2)  # mean context while decoding
    per_token = raw["weight_bytes_per_token"] + kv
    rate = statistics.median(rates) if rates else 0.0
    record.update({
        "scope": raw["scope"], "weights": raw["weights"], "prompt_tokens": raw["prompt_tokens"], "new_tokens": new,
        "runs": len(runs), "load_s": raw["load_s"],
        **{phase: stat([r[phase] for r in runs]) for phase in PHASES},
        "ttft_s": stat([sum(r[p] or 0.0 for p in PHASES) for r in runs]),
        "decode_s": stat([r["decode_s"] for r in runs]), "decode_tok_per_s": stat(rates),
        "prefill_tok_per_s": stat([raw["prompt_tokens"] / r["prefill_s"] for r in runs]),
        "peak_rss_bytes": raw["peak_rss_bytes"], "cuda_max_allocated_bytes": raw["cuda_max_allocated_bytes"],
        "torch_loaded": raw["torch_loaded"],
        "weight_bytes_per_token": raw["weight_bytes_per_token"], "kv_bytes_per_token": int(kv),
        "rss_over_weights": raw["peak_rss_bytes"] / raw["weight_bytes_per_token"],
        "effective_bandwidth_bytes_per_s": per_token * rate,
        "bandwidth_utilization_pct": 100 * per_token * rate / bandwidth if bandwidth else None,
        "notes": (job or {}).get("notes", []) + raw.get("notes", [])})
    return record


def header(report: dict) -> str:
    m, w = report["machine"], report["workload"]
    cpu, flags = m["cpu"], [f for f, on in m["cpu"]["flags"].items() if on]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v) or "none"
    missing = ", ".join(k for k, v in m["libraries"].items() if not v) or "none"
    jetson = m["jetson"]
    split = ("image tokens as the model splices them" if w["image_tokens"] is None else
             f"{w['image_tokens']} image + {w['text_tokens']} text")
    lines = [f"device: {m['device']}" + (f" ({m['gpu']['name']})" if m["gpu"] else ""),
             (f"cpu: {cpu['model']} [{cpu['arch']}], flags: {' '.join(flags) or 'none of ' + str(len(cpu['flags']))}"
              f", amx: {'yes' if cpu['amx'] else 'no'}"),
             f"threads: {m['threads']} of {m['usable_cpus']} usable CPUs; RAM {(m['ram_total_bytes'] or 0) / 1e9:.1f} GB",
             f"memory bandwidth: {m['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({m['memory_bandwidth_method']})",
             (f"jetson: {'yes, ' + jetson['module'] if jetson['is_jetson'] else 'n/a'}; nvpmodel: "
              f"{jetson['nvpmodel_mode']}; jetson_clocks: {jetson['jetson_clocks']}"),
             f"libraries: {libs} (not installed: {missing})",
             f"model: {w['model']}" + (f" (shape {w['shape']}, random weights)" if w["shape"] else ""),
             (f"workload: {w['prompt_tokens']}-token prompt ({split}), "
              f"{w['new_tokens']} new tokens (greedy, EOS ignored), {w['warmup_runs']} warm-up + {w['runs']} runs, "
              f"dtype {w['dtype']}")]
    return "\n".join(lines)


def _ms(s: dict | None) -> str:
    return "-" if s is None else f"{s['median'] * 1000:.0f}"


def table(systems: list[dict]) -> str:
    head = (f"{'system':<18}{'scope':<9}{'weights':<18}{'prep ms':>8}{'vis ms':>8}{'prefill ms':>11}{'TTFT s':>9}"
            f"{'decode tok/s (min-max)':>30}{'peak RSS GB':>13}{'RSS/W':>8}{'BW GB/s (%)':>15}")
    rows = [head, "-" * len(head)]
    for s in systems:
        if s["status"] != "ok":
            rows.append(f"{s['name']:<18}{s['status'].upper()}: {s['reason']}")
            continue
        d = s["decode_tok_per_s"]
        rate = f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})" if d else "-"
        pct = s["bandwidth_utilization_pct"]
        bw = f"{s['effective_bandwidth_bytes_per_s'] / 1e9:.1f}" + (f" ({pct:.0f}%)" if pct is not None else "")
        scope = "VLM" if s["scope"] == "vlm" else "LM only"
        rows.append(f"{s['name']:<18}{scope:<9}{s['weights'][:17]:<18}{_ms(s['preprocess_s']):>8}"
                    f"{_ms(s['vision_s']):>8}{_ms(s['prefill_s']):>11}{s['ttft_s']['median']:>9.3f}{rate:>30}"
                    f"{s['peak_rss_bytes'] / 1e9:>13.2f} {s['rss_over_weights']:>7.2f} {bw:>14}")
    if any(s.get("scope") == "language-model-only" for s in systems):
        rows.append("LM only: the language model alone, fed an equal-length prompt of text token ids "
                    "(no image preprocessing or vision encoder).")
    if any(s["status"] == "ok" for s in systems):
        rows.append("RSS/W: peak RSS over the language-model weights a decode step reads (a VLM row also holds "
                    "its vision encoder).")
    return "\n".join(rows)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def plot(report: dict, path: Path) -> str | None:
    """Write the chart: stacked TTFT (preprocess / vision / prefill) and decode tok/s (median, min-max) per
    system. Returns None, or why no chart was written (matplotlib missing, no system ran)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart written (pip install 'edgelmm[bench]')"
    ok = [s for s in report["systems"] if s["status"] == "ok"]
    if not ok:
        return "no system ran: no chart written"
    names = [s["name"] + ("" if s["scope"] == "vlm" else " (LM)") for s in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * len(ok)), sharey=True)
    start = [0.0] * len(ok)
    for phase, color in zip(PHASES, ("#8da0cb", "#fc8d62", "#66c2a5")):
        widths = [(s[phase] or {"median": 0.0})["median"] for s in ok]
        left.barh(names, widths, left=start, color=color, label=phase.removesuffix("_s"))
        start = [a + b for a, b in zip(start, widths)]
    left.invert_yaxis()  # first system on top (the axes share y)
    left.set_xlabel("time to first token, s (median)")
    left.legend(loc="lower right", fontsize=8)
    rates = [s["decode_tok_per_s"]["median"] for s in ok]
    err = [[r - s["decode_tok_per_s"]["min"] for r, s in zip(rates, ok)],
           [s["decode_tok_per_s"]["max"] - r for r, s in zip(rates, ok)]]
    right.barh(names, rates, xerr=err, color="#e78ac3", capsize=3)
    right.set_xlabel("decode tokens/s (median, min-max)")
    w = report["workload"]
    fig.suptitle(f"{Path(w['model']).name}: {w['prompt_tokens']}-token prompt, {w['new_tokens']} new tokens, "
                 f"{report['machine']['cpu']['model']}, {report['machine']['threads']} threads", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
