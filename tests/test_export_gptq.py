"""GPTQ export end to end on tiny replicas: greedy parity at 8 bits, the on-disk tensors against an independent
reading of docs/quant-formats.md §1.2-1.5, the §1.6 configs, atomic output, checksums, and foreign checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from reference import sample_image
from safetensors import safe_open
from safetensors.torch import save_file

from edgelmm import EdgeLMM
from edgelmm.export.gptq_export import export_gptq
from edgelmm.export.gptq_model import load_dtype
from edgelmm.export.gptq_settings import QuantSettings
from edgelmm.models.kv_cache import KVCache
from edgelmm.synthetic.replicas import REPLICAS

PROMPTS = ["What is in the picture?", "Describe the image.", "What colour is it?"]
NEAR_TIE = 0.2  # fp32 top-1 margins below this fraction of the logit std are decided by rounding noise


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """exported(family, **settings) -> folder of a GPTQ export (made once per settings)."""
    made, root = {}, tmp_path_factory.mktemp("gptq")

    def get(family: str, samples: int = 2, **settings):
        key = (family, samples, tuple(sorted(settings.items())))
        if key not in made:
            out = root / f"{family}-{len(made)}"
            export_gptq(tiny_checkpoint(family), out, QuantSettings(**settings), samples=samples, progress=False)
            made[key] = out
        return made[key]

    return get


def read_all(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name in sorted(set(index.values())):
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("family,stored", [("tinyllava", torch.float16), ("mipha", torch.bfloat16)])
def test_rtn_export_loads_weights_as_stored_with_the_same_result(tiny_checkpoint, tmp_path, family, stored):
    """RTN loads a 16-bit checkpoint in its own dtype (half the memory of fp32) and writes exactly what an
    fp32 load writes, since rounding happens in fp32 either way; GPTQ (calibration forwards) loads fp32."""
    src, rtn = tiny_checkpoint(family), QuantSettings(bits=4, group_size=32, method="rtn")
    assert load_dtype(src, rtn) == stored
    assert load_dtype(src, QuantSettings(bits=4, group_size=32)) == torch.float32
    ours = read_all(export_gptq(src, tmp_path / "auto", rtn, progress=False).out)
    fp32 = read_all(export_gptq(src, tmp_path / "fp32", rtn, progress=False, dtype=torch.float32).out)
    assert ours.keys() == fp32.keys() and all(torch.equal(ours[k], fp32[k]) for k in ours)


def trajectory_logits(lm: EdgeLMM, image, prompt: str, tokens: list[int]) -> torch.Tensor:
    """Next-token logits [len(tokens) + 1, V] along prompt + ``tokens`` (teacher-forced, one pass)."""
    model, t = lm.backend.model, lm.spec.text
    _, ids = lm.prompt_ids(prompt)
    with torch.inference_mode():
        features = lm.backend.encode_image(lm.pixels(image))
        embeds = model.splice(torch.tensor([ids + tokens]), features)  # (1, T, D)
        cache = KVCache(t.num_layers, t.num_kv_heads, t.head_dim, embeds.shape[1])
        return model.text(embeds, cache, 0, last_only=False)[0, len(ids) - 1:]


@pytest.mark.parametrize("family", REPLICAS)
def test_8bit_greedy_output_equals_fp32(family, tiny_checkpoint, exported):
    """The 8-bit export's greedy answers equal the fp32 model's up to the first near-tie, and along the fp32
    answers it picks the same next token at every decisive step. Tiny random replicas have flat logits and
    sharpened attention: 8-bit RTN moves their logits by ~3% of their std (rms; up to ~40% at the worst
    position), so steps won by under NEAR_TIE x std may flip; they must be a minority."""
    fp32, quant = EdgeLMM.load(tiny_checkpoint(family)), EdgeLMM.load(exported(family, bits=8))
    assert any(type(m).__name__ == "QuantLinear" for m in quant.backend.model.modules())
    decisive_steps = total = 0
    for seed, prompt in enumerate(PROMPTS):
        image = sample_image(seed)
        tokens = fp32.generate(image, prompt, max_new_tokens=6).token_ids
        expected = trajectory_logits(fp32, image, prompt, tokens)[:len(tokens)]  # (steps, V)
        got = trajectory_logits(quant, image, prompt, tokens)[:len(tokens)]
        top2 = expected.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) >= NEAR_TIE * expected.std(dim=-1)  # (steps,)
        assert (got.argmax(-1) == expected.argmax(-1))[decisive].all(), (prompt, decisive.tolist())
        decisive_steps, total = decisive_steps + int(decisive.sum()), total + len(tokens)
        first_tie = int((~decisive).nonzero()[0]) if not decisive.all() else len(tokens)
        answer = quant.generate(image, prompt, max_new_tokens=6).token_ids
        assert answer[:first_tie] == tokens[:first_tie], prompt
    assert decisive_steps >= 0.4 * total, (decisive_steps, total)


# ---- the exported tensors, read with an independent formula (docs/quant-formats.md §1.5) ----

def unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned ``bits``-bit fields of int32 words, lowest field first, laid out along ``axis``."""
    u = words.view(np.uint32).astype(np.int64)
    fields = [(u >> (bits * j)) & ((1 << bits) - 1) for j in range(32 // bits)]
    stacked = np.stack(fields, axis=axis + 1)  # the fields of word i sit at i*pf + j
    shape = list(u.shape)
    shape[axis] *= 32 // bits
    return stacked.reshape(shape)


def reference_weight(tensors: dict, prefix: str, bits: int, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] and the per-element step (scale) [N, K] from ``prefix.qweight/qzeros/scales/g_idx``."""
    q = unpack(tensors[prefix + "qweight"].numpy(), bits, axis=0)  # [K, N]
    z = unpack(tensors[prefix + "qzeros"].numpy(), bits, axis=1)  # [G, N]
    if fmt == "gptq":
        z = (z + 1) & ((1 << bits) - 1)
    s = tensors[prefix + "scales"].numpy().astype(np.float64)  # [G, N]
    g = tensors[prefix + "g_idx"].numpy()  # [K]
    return (s[g] * (q - z[g])).T, s[g].T


@pytest.mark.parametrize("settings", [{"bits": 4, "group_size": 32, "sym": False, "method": "rtn"},
                                      {"bits": 8, "group_size": 128, "method": "rtn"}])
def test_rtn_tensors_dequantize_within_one_step(settings, tiny_checkpoint, exported):
    src, out = tiny_checkpoint("tinyllava"), exported("tinyllava", **settings)
    original, written = read_all(src), read_all(out)
    fmt = "gptq" if settings.get("sym", True) else "gptq_v2"
    prefixes = sorted(k[:-len("qweight")] for k in written if k.endswith(".qweight"))
    assert len(prefixes) == 12  # 2 Phi layers x (q, k, v, dense, fc1, fc2); vision, connector, lm_head stay fp16
    for prefix in prefixes:
        w = original[prefix + "weight"].double().numpy()  # [N, K]
        k = w.shape[1]
        assert written[prefix + "qweight"].dtype == torch.int32 and written[prefix + "qweight"].shape == (
            k * settings["bits"] // 32, w.shape[0])
        assert written[prefix + "scales"].dtype == torch.float16 and written[prefix + "bias"].dtype == torch.float16
        g = k if settings["group_size"] == -1 else settings["group_size"]
        assert written[prefix + "g_idx"].tolist() == [i // g for i in range(k)]
        deq, step = reference_weight(written, prefix, settings["bits"], fmt)
        err = np.abs(deq - w) / step
        assert err.max() <= 1, prefix  # within the quantization step everywhere
        if fmt == "gptq":  # sym: half a step, plus what the fp16 scale's rounding (2^-11) adds at the grid's end
            assert err.max() <= 0.5 + 2.0 ** (settings["bits"] - 1 - 11), prefix
        else:  # asym: the rounded zero point shifts the grid, so values at its ends may be up to a step off
            assert err.mean() <= 0.3, prefix  # uniform rounding error averages a quarter step
    for key, tensor in original.items():  # everything else: same key, fp16
        if key[:-len("weight")] not in prefixes:
            assert written[key].dtype == torch.float16 and written[key].shape == tensor.shape


def test_gptq_tensors_dequantize_near_the_weights(tiny_checkpoint, exported):
    """GPTQ moves weights off their nearest grid point to compensate earlier errors: within a few steps, on
    average within half a step. Sym v1 zeros are exactly 0x7F7F7F7F (zero 128 stored as 127)."""
    src, out = tiny_checkpoint("tiny-llava-hf"), exported("tiny-llava-hf", bits=8)
    original, written = read_all(src), read_all(out)
    prefixes = sorted(k[:-len("qweight")] for k in written if k.endswith(".qweight"))
    assert len(prefixes) == 14  # 2 Llama layers x (q, k, v, o, gate, up, down)
    for prefix in prefixes:
        assert (written[prefix + "qzeros"].numpy().view(np.uint32) == 0x7F7F7F7F).all()
        w = original[prefix + "weight"].double().numpy()
        deq, step = reference_weight(written, prefix, 8, "gptq")
        err = np.abs(deq - w) / step
        assert err.max() <= 4 and err.mean() <= 0.5, (prefix, err.max(), err.mean())


def test_quantization_config_follows_section_1_6(tiny_checkpoint, exported):
    out = exported("tiny-llava-hf", group_size=32, act_order=True)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert {k: qc[k] for k in ("quant_method", "method", "bits", "group_size", "desc_act", "static_groups", "sym",
                               "lm_head", "checkpoint_format", "format", "pack_dtype")} == {
        "quant_method": "gptq", "method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
        "static_groups": True, "sym": True, "lm_head": False, "checkpoint_format": "gptq", "format": "gptq",
        "pack_dtype": "int32"}
    assert qc["damp_percent"] == 0.01 and isinstance(qc["true_sequential"], bool)
    assert qc["block_name_to_quantize"] == "language_model.model.layers"
    assert sorted(m for group in qc["modules_in_block_to_quantize"] for m in group) == sorted(
        f"{part}.{name}" for part, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for name in (f"{n}_proj" for n in names))
    assert ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] in qc["modules_in_block_to_quantize"]
    assert qc["meta"]["quantizer"][0].startswith("edgelmm:")
    assert config["model_type"] == "llava" and config["torch_dtype"] == "float16"
    manifest = json.loads((out / "edgelmm.json").read_text())
    assert manifest["family"] == "llava-hf" and manifest["image_tokens"] == 576 and manifest["template"]
    assert manifest["quantization"]["bits"] == 4 and "tokenizer.json" in manifest["files"]
    phi = json.loads((exported("tinyllava", bits=8) / "quantize_config.json").read_text())
    assert phi["modules_in_block_to_quantize"][-2:] == [["self_attn.dense"], ["mlp.fc2"]]
    assert phi["block_name_to_quantize"] == "language_model.model.layers"
    asym = json.loads((exported("tinyllava", bits=4, group_size=32, sym=False, method="rtn") /
                       "quantize_config.json").read_text())
    assert asym["sym"] is False and asym["checkpoint_format"] == asym["format"] == "gptq_v2"


def test_legacy_export_carries_its_vision_tower(tiny_checkpoint, exported):
    out = exported("tinyllava-legacy", bits=8)
    tower = json.loads((out / "config.json").read_text())["mm_vision_tower"]
    assert (out / tower / "config.json").is_file() and (out / tower / "model.safetensors.index.json").is_file()
    assert f"{tower}/config.json" in json.loads((out / "edgelmm.json").read_text())["files"]


# ---- atomic output, checksums ----

STALLING_EXPORT = """
import sys, time
import edgelmm.export.gptq_model as gm
real = gm._quantize_linears
def stall(*args, **kwargs):
    real(*args, **kwargs)
    print("STALLED", file=sys.stderr, flush=True)
    time.sleep(600)
gm._quantize_linears = stall
from edgelmm.cli import main
sys.exit(main(["export", sys.argv[1], "-o", sys.argv[2], "--bits", "8", "--samples", "2", "--quiet"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_export_leaves_no_output_folder(sig, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", STALLING_EXPORT, str(tiny_checkpoint("tinyllava")), str(out)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while "STALLED" not in proc.stderr.readline():  # first decoder layer quantized, mid-pass
            assert proc.poll() is None and time.monotonic() < deadline, "the export did not reach the GPTQ pass"
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers == [] if sig == signal.SIGTERM else all(p.startswith(".out.partial-") for p in leftovers)


def test_refuses_existing_output_and_unknown_format(tiny_checkpoint, tmp_path):
    (tmp_path / "taken").mkdir()
    cli = [sys.executable, "-m", "edgelmm.cli", "export", str(tiny_checkpoint("tinyllava"))]
    taken = subprocess.run([*cli, "-o", str(tmp_path / "taken")], capture_output=True, text=True, check=False)
    assert taken.returncode == 2 and "already exists" in taken.stderr
    bogus = subprocess.run([*cli, "-o", str(tmp_path / "x"), "--format", "bogus"], capture_output=True, text=True,
                           check=False)
    assert bogus.returncode == 2 and "unknown export format 'bogus'" in bogus.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# ---- a GPTQ checkpoint written by "another tool": standard layout, no manifest ----

def foreign_quantize(w: np.ndarray, bits: int, group: int, g_idx: np.ndarray):
    """Sym RTN by the §1.3 formulas with ``g_idx``-chosen groups; returns packed tensors and W' [N, K]."""
    n, k = w.shape
    maxq, zero = (1 << bits) - 1, 1 << (bits - 1)
    groups = k // group
    absmax = np.stack([np.abs(w[:, g_idx == gi]).max(axis=1) for gi in range(groups)])  # [G, N]
    scales = (2 * absmax / maxq).astype(np.float16).astype(np.float64)  # [G, N]
    q = np.clip(np.round(w.T / scales[g_idx]) + zero, 0, maxq).astype(np.uint64)  # [K, N]
    pf = 32 // bits
    qweight = sum(q[j::pf] << np.uint64(bits * j) for j in range(pf)).astype(np.uint32)  # [K/pf, N]
    zstore = np.full((groups, n), zero - 1, dtype=np.uint64)  # v1 stores zero - 1
    qzeros = sum(zstore[:, j::pf] << np.uint64(bits * j) for j in range(pf)).astype(np.uint32)  # [G, N/pf]
    deq = (scales[g_idx] * (q.astype(np.float64) - zero)).T  # [N, K]
    return qweight.view(np.int32), qzeros.view(np.int32), scales.astype(np.float16), deq


@pytest.mark.parametrize("variant", ["config.json, no g_idx", "quantize_config.json, permuted g_idx"])
def test_loads_a_foreign_gptq_checkpoint(variant, tiny_checkpoint, tmp_path):
    src, folder = tiny_checkpoint("tiny-llava-hf"), tmp_path / "foreign"
    shutil.copytree(src, folder)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    state, fp32 = read_all(src), EdgeLMM.load(src)
    with_g_idx = "permuted" in variant
    for key in [k for k in state if ".layers." in k and "language_model" in k and k.endswith("proj.weight")]:
        w = state.pop(key).double().numpy()
        k = w.shape[1]
        g_idx = ((np.arange(k) * 7) % k) // 32 if with_g_idx else np.arange(k) // 32
        qweight, qzeros, scales, deq = foreign_quantize(w, 4, 32, g_idx)
        prefix = key[:-len("weight")]
        state.update({prefix + "qweight": torch.from_numpy(qweight), prefix + "qzeros": torch.from_numpy(qzeros),
                      prefix + "scales": torch.from_numpy(scales)})
        if with_g_idx:
            state[prefix + "g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        name = key.replace("language_model.model.", "text.")[:-len(".weight")]
        fp32.backend.model.get_submodule(name).weight.data = torch.from_numpy(deq).float()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    qc = {"bits": 4, "group_size": 32, "desc_act": with_g_idx, "sym": True}
    config = json.loads((folder / "config.json").read_text())
    if with_g_idx:  # AutoGPTQ style: only quantize_config.json
        (folder / "quantize_config.json").write_text(json.dumps(qc))
    else:
        config["quantization_config"] = {**qc, "quant_method": "gptq"}
    (folder / "config.json").write_text(json.dumps(config))
    quant = EdgeLMM.load(folder)
    assert sum(type(m).__name__ == "QuantLinear" for m in quant.backend.model.modules()) == 14
    image = sample_image(3)
    expected = trajectory_logits(fp32, image, PROMPTS[0], [5, 6, 7])
    torch.testing.assert_close(trajectory_logits(quant, image, PROMPTS[0], [5, 6, 7]), expected,
                               rtol=1e-4, atol=1e-4)
