"""The latency benchmark's harness on the tiny shape: the JSON's fields, types and units, the chart, the
exact prompt length, and unavailable peers reported as skipped with a reason (harness correctness, not speed)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgelmm.bench import command as bench
from edgelmm.errors import ConfigError

STAT_FIELDS = ("preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_s", "decode_tok_per_s", "prefill_tok_per_s")
HAS = {m: importlib.util.find_spec(m) is not None for m in ("matplotlib", "llama_cpp", "onnxruntime_genai", "onnx_ir")}


def _check_stat(value, name):
    assert set(value) == {"median", "min", "max"}, name
    assert all(isinstance(v, float) and v > 0 for v in value.values()), name
    assert value["min"] <= value["median"] <= value["max"], name


def _check_ok(system, prompt_tokens, new_tokens):
    assert system["scope"] in ("vlm", "language-model-only")
    assert system["prompt_tokens"] == prompt_tokens and system["new_tokens"] == new_tokens
    for name in STAT_FIELDS:
        if system[name] is None:
            assert name in ("preprocess_s", "vision_s") and system["scope"] == "language-model-only", name
        else:
            _check_stat(system[name], name)
    ttft = system["ttft_s"]["median"]
    assert ttft >= system["prefill_s"]["median"]
    for name in ("peak_rss_bytes", "weight_bytes_per_token", "kv_bytes_per_token"):
        assert isinstance(system[name], int) and system[name] > 0, name
    assert system["peak_rss_bytes"] > 50e6  # a whole process, in bytes (not KiB)
    assert system["rss_over_weights"] == pytest.approx(system["peak_rss_bytes"] / system["weight_bytes_per_token"])
    assert isinstance(system["effective_bandwidth_bytes_per_s"], float) and system["effective_bandwidth_bytes_per_s"] > 0
    assert 0 < system["bandwidth_utilization_pct"]
    rate = system["decode_tok_per_s"]["median"]
    per_token = system["weight_bytes_per_token"] + system["kv_bytes_per_token"]
    assert system["effective_bandwidth_bytes_per_s"] == pytest.approx(per_token * rate)
    assert isinstance(system["notes"], list)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One CLI run on the tiny shape: every backend and the installed peers (llama.cpp at Q4_0 only)."""
    tmp = tmp_path_factory.mktemp("bench")
    peers = ["transformers"] + (["llama.cpp"] if HAS["llama_cpp"] else [])
    peers += ["ort-genai"] if HAS["onnxruntime_genai"] and HAS["onnx_ir"] else []
    cmd = [sys.executable, "-m", "edgelmm.cli", "bench", "--shape", "tiny", "--cache-dir", str(tmp / "cache"),
           "--prompt-tokens", "800", "--new-tokens", "5", "--runs", "2", "--bandwidth-mib", "32",
           "--backends", "torch,gptq4,onnx4,onnx4-lm", "--peers", ",".join(peers), "--gguf", "Q4_0",
           "--json", str(tmp / "out.json"), "--plot", str(tmp / "out.png")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp / "out.json").read_text()), proc.stdout, tmp


def test_report_fields_types_and_units(report):
    data, stdout, _ = report
    assert data["schema"] == "edgelmm.bench/1"
    machine, workload = data["machine"], data["workload"]
    assert machine["device"] == "cpu" and machine["gpu"] is None
    assert isinstance(machine["cpu"]["model"], str) and isinstance(machine["cpu"]["flags"]["avx2"], bool)
    assert machine["threads"] >= 1 and machine["memory_bandwidth_bytes_per_s"] > 1e8  # bytes/s, not GB/s
    assert machine["host_copy_bandwidth_after_bytes_per_s"] > 1e8
    assert machine["jetson"]["nvpmodel_mode"] == "n/a" and machine["jetson"]["jetson_clocks"] == "n/a"
    assert set(machine["libraries"]) >= {"torch", "onnxruntime", "transformers", "llama_cpp"}
    assert workload["prompt_tokens"] == 800 and workload["image_tokens"] + workload["text_tokens"] == 800
    names = [s["name"] for s in data["systems"]]
    assert names[:4] == ["edgelmm-torch", "edgelmm-gptq4", "edgelmm-onnx4", "edgelmm-onnx4-lm"]
    assert "transformers" in names
    for system in data["systems"]:
        assert system["status"] in ("ok", "skipped", "failed") and system["kind"] in ("backend", "peer")
        assert system["status"] != "failed", (system["name"], system.get("reason"))  # skipped = not installed
        if system["status"] == "ok":
            _check_ok(system, 800, 5)
        else:
            assert isinstance(system["reason"], str) and system["reason"], system["name"]
    by_name = {s["name"]: s for s in data["systems"]}
    assert by_name["edgelmm-torch"]["status"] == "ok" and by_name["edgelmm-torch"]["scope"] == "vlm"
    assert by_name["edgelmm-gptq4"]["status"] == "ok" and "4-bit" in by_name["edgelmm-gptq4"]["weights"]
    assert by_name["transformers"]["status"] == "ok"
    assert by_name["edgelmm-onnx4"]["status"] == "ok" and "4-bit" in by_name["edgelmm-onnx4"]["weights"]
    from edgelmm.backends.onnx import ops as ort_ops
    assert ("edgelmm ops" in by_name["edgelmm-onnx4"]["weights"]) == (ort_ops.unavailable_reason() is None)
    assert by_name["transformers"]["scope"] == "language-model-only"  # Factory TinyLLaVA: HF has no class for it
    for name, system in by_name.items():  # torch (~0.3 GB of RSS) only in the processes that run on it
        if system["status"] == "ok":
            assert system["torch_loaded"] == (name in ("edgelmm-torch", "edgelmm-gptq4", "transformers")), name
    lm_only = by_name["edgelmm-onnx4-lm"]  # the onnx4 export's decoder alone, fed the peers' text prompt
    assert lm_only["status"] == "ok" and lm_only["scope"] == "language-model-only"
    assert lm_only["model_path"] == by_name["edgelmm-onnx4"]["model_path"]  # one export for both
    assert lm_only["vision_s"] is None and lm_only["weights"] == by_name["edgelmm-onnx4"]["weights"]
    assert "device: cpu" in stdout and "memory bandwidth" in stdout and "jetson_clocks: n/a" in stdout
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.split()}
    assert "RSS/W" in stdout
    for name, system in by_name.items():  # the table shows each system's peak RSS over its weights
        if system["status"] == "ok":
            assert f" {system['rss_over_weights']:.2f} " in rows[name], name


@pytest.mark.skipif(not HAS["matplotlib"], reason="matplotlib not installed")
def test_chart_is_written(report):
    data, _, tmp = report
    assert data["plot"] == str(tmp / "out.png") and data["plot_note"] is None
    assert (tmp / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_said(monkeypatch, tmp_path):
    from edgelmm.bench import report as bench_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when not installed
    note = bench_report.plot({"systems": []}, tmp_path / "x.png")
    assert "matplotlib is not installed" in note and not (tmp_path / "x.png").exists()


def test_unavailable_peers_and_exporters_are_skipped(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    hidden = ("llama_cpp", "onnxruntime_genai", "onnx")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    args = bench.build_parser().parse_args([
        "--shape", "tiny", "--cache-dir", str(tmp_path), "--prompt-tokens", "800", "--new-tokens", "3",
        "--runs", "1", "--warmup", "0", "--bandwidth-mib", "16", "--backends", "onnx4",
        "--peers", "llama.cpp,ort-genai", "--json", str(tmp_path / "r.json")])
    report = bench.run(args)
    by_name = {s["name"]: s for s in report["systems"]}
    assert by_name["edgelmm-onnx4"]["status"] == "skipped" and "onnx" in by_name["edgelmm-onnx4"]["reason"]
    for name in ("llama.cpp-Q4_0", "llama.cpp-Q8_0", "ort-genai"):
        assert by_name[name]["status"] == "skipped" and "not installed" in by_name[name]["reason"], name
    assert "SKIPPED: llama_cpp is not installed" in capsys.readouterr().out
    assert all(s["reason"] for s in json.loads(Path(tmp_path / "r.json").read_text())["systems"])


def test_prompt_has_exactly_the_requested_tokens(tiny_checkpoint):
    from edgelmm.api import EdgeLMM
    from edgelmm.bench.prompt import bench_prompt, text_only

    lm = EdgeLMM.load(tiny_checkpoint("llava-gemma"))
    marks = set(lm.spec.image_ids)
    image = lm.spec.vision.num_image_tokens
    for n in (image + 60, image + 300):
        ids = bench_prompt(lm, n)
        assert len(ids) == n and sum(t in marks for t in ids) == image
        text = text_only(ids, marks, lm.tokenizer)
        assert len(text) == n and not marks & set(text)
    with pytest.raises(ConfigError, match="prompt-tokens"):
        bench_prompt(lm, image // 2)
