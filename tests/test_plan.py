"""The memory planner: its prediction against memory actually allocated, the budget check at load time,
and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgelmm import EdgeLMM
from edgelmm.errors import ConfigError, MemoryBudgetError
from edgelmm.plan.memory import PlanSettings, parse_size, quantized_linear_bytes
from edgelmm.plan.sources import plan_for
from edgelmm.process_memory import resident_bytes
from edgelmm.synthetic.replicas import REPLICAS


def allocated_bytes(model: EdgeLMM, features: torch.Tensor) -> int:
    """Bytes of every distinct tensor storage the loaded model holds, plus the KV cache and image features."""
    backend = model.backend
    storages = {}
    for t in [*backend.model.parameters(), *backend.model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) + backend.cache.nbytes + features.numel() * features.element_size()


@pytest.mark.parametrize("family", [*REPLICAS, "tinygpt-v"])
def test_plan_matches_allocated_bytes_on_tiny_models(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    model = EdgeLMM.load(folder, context_length=2048)
    features = model.backend.encode_image(model.pixels(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()))
    plan = plan_for(str(folder), PlanSettings(dtype_bytes=4, kv_bits=32, context=model.backend.max_seq_len))
    static = plan.total - plan.parts["activations"]
    assert abs(static - allocated_bytes(model, features)) / allocated_bytes(model, features) < 0.10


def test_onnx_export_plan_matches_its_graphs_and_kv_buffers(tiny_checkpoint, tmp_path, monkeypatch):
    """An ONNX export is planned torch-free from its own files: graph weights vs the initializers onnx reads,
    the KV cache vs the buffers the backend allocates; max_memory refuses before any session is made."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    from edgelmm.export.gptq_settings import QuantSettings
    from edgelmm.export.onnx_export import export_onnx

    out = export_onnx(tiny_checkpoint("tinyllava", "old", "llama"), tmp_path / "onnx",
                      QuantSettings(bits=4, group_size=32, method="rtn"), progress=False)
    plan = plan_for(str(out), PlanSettings(context=256))
    for part, graph in (("vision graph", "vision"), ("embedding graph", "embedding"), ("decoder graph", "decoder")):
        weights = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(out / f"{graph}.onnx")).graph.initializer)
        assert weights <= plan.parts[part] < 1.2 * weights + 50_000, part  # + the graph's own protobuf
    model = EdgeLMM.load(out, context_length=256)
    kv = sum(v.numpy().nbytes for pair in model.backend.decoder.kv for v in pair)  # fp16 on edgelmm's op
    assert plan.parts["kv cache"] == kv
    with monkeypatch.context() as m:  # refused before any session is made
        m.setattr(onnxruntime, "InferenceSession", None)
        with pytest.raises(MemoryBudgetError, match=r"(?s)needs about.*decoder graph.*does NOT fit"):
            EdgeLMM.load(out, context_length=256, max_memory=plan.total - 1)
    EdgeLMM.load(out, context_length=256, max_memory=plan.total)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "plan_onnx.py"  # the full-size measurement
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "measured peak RSS growth" in proc.stdout, proc.stderr


def test_quantized_linear_bytes_follow_the_gptq_layout():
    # Phi-2 fc1: K=2560 inputs, N=10240 outputs, 4-bit, g128: qweight K*N/2, qzeros and fp16 scales per group
    k, n, groups = 2560, 10240, 20
    assert quantized_linear_bytes(n, k, 4, 128) == k * n // 2 + groups * n // 2 + groups * n * 2 + k * 4
    assert quantized_linear_bytes(n, k, 8, -1) == k * n + n + 2 * n + k * 4


@pytest.mark.parametrize("name", ["TinyLLaVA-Phi-2-SigLIP-3.1B", "Mipha-3B", "llava-gemma-2b"])
def test_released_models_fit_4gb_at_4_bits(name):
    """TensorRT Edge-LLM reports 4.49 GB peak for a 2B VLM on a Jetson Orin Nano; ours must stay under 4 GB."""
    plan = plan_for(name, PlanSettings(bits=4, context=2048), budget=parse_size("4GB"))
    assert plan.fits, plan.table()
    assert plan.parts["llm weights"] < plan_for(name, PlanSettings(bits=16)).parts["llm weights"] / 3


def test_tinygpt_v_plan_is_over_4gb_with_its_fp16_vision_tower():
    """Its fp16 EVA ViT-g alone is over 2 GB; at 16 bits the whole model is about TinyGPT-V's own 8 GB claim.
    EVA is never GPTQ-quantized (its ONNX export runs it int8), so planning --quantize-vision is refused."""
    assert not plan_for("tinygpt-v", PlanSettings(bits=4), budget=parse_size("4GB")).fits
    assert plan_for("tinygpt-v", PlanSettings(bits=4)).parts["vision tower"] > 2e9
    full = plan_for("tinygpt-v", PlanSettings(bits=16)).total
    assert 7.5e9 < full < 9e9
    with pytest.raises(ConfigError, match="ONNX"):
        plan_for("tinygpt-v", PlanSettings(bits=4, quantize_vision=True))


def test_int8_kv_halves_the_cache():
    fp16 = plan_for("mipha-3b", PlanSettings(bits=4)).parts["kv cache"]
    int8 = plan_for("mipha-3b", PlanSettings(bits=4, kv_bits=8)).parts["kv cache"]
    assert int8 < 0.55 * fp16


@pytest.mark.parametrize("family", ["tinyllava", "tinygpt-v"])
def test_load_refuses_a_model_that_cannot_fit(tiny_checkpoint, family):
    with pytest.raises(MemoryBudgetError, match=r"(?s)needs about.*kv cache.*does NOT fit"):
        EdgeLMM.load(tiny_checkpoint(family), max_memory="2MB")
    EdgeLMM.load(tiny_checkpoint(family), max_memory="1GB")


def test_load_budgets_a_gptq_export_at_its_bits(tiny_checkpoint, tmp_path):
    """max_memory plans a GPTQ export at its own bits: a budget that `edgelmm plan` says the 4-bit export fits
    (and the unquantized checkpoint does not) admits the export and refuses the checkpoint."""
    from edgelmm.export.gptq_export import export_gptq
    from edgelmm.export.gptq_settings import QuantSettings

    src = tiny_checkpoint("tinyllava")
    out = export_gptq(src, tmp_path / "q4", QuantSettings(bits=4, group_size=32, method="rtn"), progress=False).out
    settings = PlanSettings(dtype_bytes=4, kv_bits=32, context=16)  # fp32 on CPU, as EdgeLMM.load runs it
    budget = 1.02 * plan_for(str(out), settings).total
    assert budget < plan_for(str(src), settings).total
    EdgeLMM.load(out, context_length=16, max_memory=budget)
    with pytest.raises(MemoryBudgetError):
        EdgeLMM.load(src, context_length=16, max_memory=budget)


def test_sizes_are_parsed():
    assert parse_size("8GB") == 8_000_000_000 and parse_size("1.5 GiB") == 1.5 * 2**30
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_plan_cli_json():
    proc = subprocess.run([sys.executable, "-m", "edgelmm.cli", "plan", "Mipha-3B", "--bits", "4", "--memory", "4GB",
                           "--json"], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert out["fits"] and out["total"] == sum(out["parts"].values()) and out["budget"] == 4_000_000_000


@pytest.mark.slow
def test_plan_matches_measured_memory_for_a_full_size_shape():
    """Materialize the full-size TinyLLaVA-3.1B shape in fp16 (weights and a 2048-token cache, every page
    touched) and compare the resident-memory growth with the plan."""
    from edgelmm.backends.torch.backend import new_cache
    from edgelmm.families import detect
    from edgelmm.models.vlm import VLM
    from edgelmm.synthetic.shapes import shape_config

    spec = detect(shape_config("tinyllava-phi2-siglip-3.1b"), __import__("pathlib").Path("."), [])
    before = resident_bytes()
    with torch.device("meta"):
        model = VLM(spec)
    model = model.to_empty(device="cpu").half()
    for t in model.parameters():
        t.data.zero_()
    cache = new_cache(spec, 2048, torch.float16, torch.device("cpu"))
    cache.data.zero_()
    measured = resident_bytes() - before
    plan = plan_for("tinyllava-phi2-siglip-3.1b", PlanSettings(bits=16, context=2048))
    predicted = plan.total - plan.parts["activations"] - plan.parts["image features"]
    print(f"plan {predicted / 1e9:.3f} GB, measured RSS growth {measured / 1e9:.3f} GB")
    assert abs(predicted - measured) / measured < 0.10
