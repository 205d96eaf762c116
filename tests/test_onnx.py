"""ONNX export and the onnxruntime backend against the torch backend, for every family: graphs pass
onnx.checker, the unquantized export's logits match, the 4-bit export's greedy tokens match the torch model
holding the same quantized weights, and the ONNX path runs without torch."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from reference import sample_image

from edgelmm import EdgeLMM
from edgelmm.backends.onnx.backend import OnnxBackend
from edgelmm.backends.onnx.config import CONFIG_NAME
from edgelmm.checkpoint.manifest import read_manifest
from edgelmm.cli import main as cli_main
from edgelmm.config import TextConfig
from edgelmm.errors import ConfigError
from edgelmm.export import onnx_graph
from edgelmm.export.gptq_settings import QuantSettings
from edgelmm.export.onnx_decoder import build_decoder, fused_rotary
from edgelmm.export.onnx_export import export_onnx, quantize_for_onnx
from edgelmm.export.onnx_weights import decoder_linears, decoder_norms
from edgelmm.models.kv_cache import KVCache
from edgelmm.models.layers import bind_kernels
from edgelmm.models.text import TextModel
from edgelmm.plan.sources import plan_onnx_export
from edgelmm.synthetic.shapes import TINY

CASES = ([(f, "old", "phi") for f in ("tinyllava", "tinyllava-legacy", "llava-gemma", "tiny-llava-hf", "mipha")]
         + [("tinyllava", "old", llm) for llm in ("llama", "gemma", "qwen2")] + [("tinygpt-v", "old", "phi")])
QUESTION = "What is in the picture?"
STEPS = 12
RTN4 = QuantSettings(bits=4, group_size=32, method="rtn")
GRAPHS = ("vision.onnx", "embedding.onnx", "decoder.onnx")


@pytest.fixture(autouse=True)
def fp32_kv_cache(monkeypatch):
    """Parity to 1e-4 needs the fp32 KV cache: on CPU the runtime keeps it in fp16 by default (edgelmm's
    attention op; tests/test_ort_gqa.py measures that), EDGELMM_ONNX_KV=float32 keeps the export's fp32."""
    monkeypatch.setenv("EDGELMM_ONNX_KV", "float32")


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    """exports(family, layout, llm, bits) -> (export folder, torch reference EdgeLMM with the same weights)."""
    root, made = tmp_path_factory.mktemp("onnx"), {}

    def get(family, layout, llm, bits):
        key = (family, layout, llm, bits)
        if key not in made:
            src = tiny_checkpoint(family, layout, llm)
            settings = None if bits == 16 else RTN4
            out = export_onnx(src, root / "-".join(map(str, key)), settings, accuracy_level=0, progress=False,
                              vision_bits=16)
            ref = EdgeLMM.load(src, device="cpu", dtype=torch.float32)
            quantize_for_onnx(ref, settings)
            made[key] = out, ref
        return made[key]

    return get


def _ops(folder: Path, graph: str) -> set[str]:
    return {n.op_type for n in onnx.load(str(folder / graph)).graph.node}


@pytest.mark.parametrize("family,layout,llm", CASES)
def test_unquantized_export_logits_match_torch(exports, family, layout, llm):
    out, ref = exports(family, layout, llm, 16)
    model = EdgeLMM.load(out)
    assert type(model.backend).__name__ == "OnnxBackend"
    image = sample_image()
    _, ids = model.prompt_ids(QUESTION)
    assert ids == ref.prompt_ids(QUESTION)[1]
    features = model.backend.encode_image(model.pixels(image))
    ref_features = ref.backend.encode_image(ref.pixels(image))
    assert np.abs(features - ref_features.numpy()).max() / ref_features.abs().max() < 1e-4
    ours, theirs = model.backend.prefill(ids, features), ref.backend.prefill(ids, ref_features)
    token = int(theirs.argmax())
    for position in (len(ids), len(ids) + 1):  # the prompt, then two cached decode steps
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() / scale < 1e-4, position
        ours, theirs = model.backend.decode(token, position), ref.backend.decode(token, position)


@pytest.mark.parametrize("llm", ["phi", "llama"])
def test_chunked_prefill_matches_torch(exports, monkeypatch, llm):
    """EDGELMM_PREFILL_CHUNK=7 runs the prompt as equal decoder runs of at most 7 tokens over the growing cache:
    the logits of torch's one-pass prefill to 1e-4, then the same cached decode steps; the memory plan counts
    one chunk's activations."""
    out, ref = exports("tinyllava", "old", llm, 16)
    whole = plan_onnx_export(out).parts["activations"]
    monkeypatch.setenv("EDGELMM_PREFILL_CHUNK", "7")
    assert plan_onnx_export(out).parts["activations"] < whole
    model = EdgeLMM.load(out)
    assert model.backend.decoder.chunk == 7
    image = sample_image()
    _, ids = model.prompt_ids(QUESTION)
    assert len(ids) > 3 * 7
    features = model.backend.encode_image(model.pixels(image))
    ours = model.backend.prefill(ids, features)
    theirs = ref.backend.prefill(ids, ref.backend.encode_image(ref.pixels(image)))
    token = int(theirs.argmax())
    for position in (len(ids), len(ids) + 1):
        assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4, position
        ours, theirs = model.backend.decode(token, position), ref.backend.decode(token, position)
    monkeypatch.setenv("EDGELMM_PREFILL_CHUNK", "seven")
    with pytest.raises(ConfigError, match="EDGELMM_PREFILL_CHUNK"):
        EdgeLMM.load(out)


def test_language_model_alone_without_the_vision_graph(exports):
    """OnnxBackend.load(vision=False) opens only the embedding and decoder graphs (``edgelmm bench``'s
    onnx4-lm): a text-only prompt's logits match torch's language model; asking it for image features, or an
    image prompt without them, is a ConfigError."""
    out, ref = exports("tinyllava", "old", "phi", 16)
    backend = OnnxBackend.load(out, vision=False)
    assert backend.vision is None
    model = EdgeLMM.load(out)
    _, ids = model.prompt_ids(QUESTION)
    text_ids = [i for i in ids if i not in set(backend.image_ids.tolist())]
    assert 0 < len(text_ids) < len(ids)
    ours = backend.prefill(text_ids, None)
    with torch.inference_mode():
        lm = ref.backend.model.text
        theirs = lm(lm.embed(torch.tensor([text_ids])), ref.backend.cache, start=0)[0, -1].numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
    with pytest.raises(ConfigError, match="vision graph"):
        backend.encode_image(model.pixels(sample_image()))
    with pytest.raises(ConfigError, match="image positions"):
        backend.prefill(ids, None)
    with pytest.raises(ConfigError, match="empty"):
        backend.prefill([], None)


@pytest.mark.parametrize("family,layout,llm", CASES)
def test_4bit_export_greedy_tokens_match_torch_with_same_weights(exports, family, layout, llm):
    out, ref = exports(family, layout, llm, 4)
    for graph in GRAPHS:
        onnx.checker.check_model(str(out / graph))
    decoder_ops = _ops(out, "decoder.onnx")
    assert {"MatMulNBits", "GroupQueryAttention"} <= decoder_ops and "MatMul" not in decoder_ops
    norm = "SkipLayerNormalization" if ref.spec.text.arch == "phi" else "SkipSimplifiedLayerNormalization"
    assert norm in decoder_ops
    model = EdgeLMM.load(out)
    image = sample_image()
    ours = model.generate(image, QUESTION, max_new_tokens=STEPS, stop_token_ids=()).token_ids
    theirs = ref.generate(image, QUESTION, max_new_tokens=STEPS, stop_token_ids=()).token_ids
    assert len(theirs) > 1 and ours == theirs
    mirrored = image.transpose(0)  # PIL FLIP_LEFT_RIGHT: the image path must matter, in both runtimes alike
    theirs_mirrored = ref.generate(mirrored, QUESTION, max_new_tokens=STEPS, stop_token_ids=()).token_ids
    assert theirs_mirrored != theirs
    assert model.generate(mirrored, QUESTION, max_new_tokens=STEPS, stop_token_ids=()).token_ids == theirs_mirrored


def _head_bits(folder: Path) -> int:
    """The LM head's bits as the decoder graph holds it (16: a fp MatMul)."""
    head = next(n for n in onnx.load(str(folder / "decoder.onnx")).graph.node if n.name.startswith("lm_head/"))
    return {a.name: a.i for a in head.attribute}["bits"] if head.op_type == "MatMulNBits" else 16


def test_export_folder_config_and_manifest(exports, tiny_checkpoint, tmp_path):
    out, _ = exports("tinyllava", "old", "phi", 4)
    manifest = read_manifest(out)
    assert manifest["backend"] == "onnx" and manifest["quantization"]["bits"] == 4
    assert set(GRAPHS) | {CONFIG_NAME, "config.json"} <= set(manifest["files"])
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert cfg["search"]["past_present_share_buffer"] is True
    assert not list(out.parent.glob(".*partial*"))  # written to a temp folder, then renamed
    assert manifest["quantization"]["lm_head_bits"] == _head_bits(out) == 8
    fp_head = export_onnx(tiny_checkpoint("tinyllava"), tmp_path / "fp-head", RTN4, lm_head_bits=None, progress=False)
    assert read_manifest(fp_head)["quantization"]["lm_head_bits"] == _head_bits(fp_head) == 16


def test_external_data_export_runs_and_is_readable(exports, tiny_checkpoint, tmp_path, monkeypatch):
    """Weights as external data (what full-size exports get) run alike, and every file keeps the umask's
    permissions (onnx creates .data files 0600)."""
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_LIMIT", 0)
    out = export_onnx(tiny_checkpoint("tinyllava"), tmp_path / "external", RTN4, accuracy_level=0, progress=False,
                      vision_bits=16)
    assert {p.name for p in out.glob("*.data")} == {f"{graph}.data" for graph in GRAPHS}
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~_umask()}
    inline, _ = exports("tinyllava", "old", "phi", 4)
    image = sample_image()
    ours = EdgeLMM.load(out).generate(image, QUESTION, max_new_tokens=STEPS, stop_token_ids=()).token_ids
    assert ours == EdgeLMM.load(inline).generate(image, QUESTION, max_new_tokens=STEPS, stop_token_ids=()).token_ids


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("family,llm,bound", [("tinyllava", "llama", 0.1), ("tinygpt-v", "phi", 0.15)])
def test_int8_compute_default_stays_close(tiny_checkpoint, tmp_path, family, llm, bound):
    """The CPU defaults (MatMulNBits accuracy_level 4: int8 activations; the vision side as int8
    DynamicQuantizeMatMul) stay near the torch model holding the same weights, and the image still matters."""
    src = tiny_checkpoint(family, "old", llm)
    out = export_onnx(src, tmp_path / "acc4", RTN4, progress=False)
    assert {a.i for n in onnx.load(str(out / "decoder.onnx")).graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "accuracy_level"} == {4}
    vision_nodes = onnx.load(str(out / "vision.onnx")).graph.node
    assert "DynamicQuantizeMatMul" in {n.op_type for n in vision_nodes}
    assert not [n.name for n in vision_nodes if n.op_type == "MatMul" and n.name.startswith(("vision.", "projector."))]
    assert read_manifest(out)["quantization"]["vision_bits"] == 8
    model, ref = EdgeLMM.load(out), EdgeLMM.load(src, device="cpu", dtype=torch.float32)
    quantize_for_onnx(ref, RTN4, vision_bits=8)
    image, (_, ids) = sample_image(), model.prompt_ids(QUESTION)
    features = model.backend.encode_image(model.pixels(image))
    ref_features = ref.backend.encode_image(ref.pixels(image)).numpy()
    mirrored = ref.backend.encode_image(ref.pixels(image.transpose(0))).numpy()  # PIL FLIP_LEFT_RIGHT
    error, image_effect = np.linalg.norm(features - ref_features), np.linalg.norm(mirrored - ref_features)
    assert error < bound * np.linalg.norm(ref_features) and error < bound * image_effect  # 6.5% / 9% measured
    ours = model.backend.prefill(ids, features)
    theirs = ref.backend.prefill(ids, torch.from_numpy(ref_features))
    cos = float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs))
    assert cos > 0.99 and int(ours.argmax()) == int(theirs.argmax())


@pytest.mark.parametrize("k,group,asym", [(160, 128, False), (4304, 128, True), (256, 32, False)])
def test_repacked_linear_matches_the_gptq_formula(k, group, asym):
    """A GPTQ-packed linear repacked into MatMulNBits computes x @ W^T for W from the dequantization formula
    (docs/quant-formats.md §1.5: scale[g] * (q - zero[g])), also when K is not a multiple of the group (the last
    MatMulNBits block is then padded: SigLIP's fc2 has K = 4304)."""
    import onnxruntime as ort

    from edgelmm.export.onnx_graph import GraphBuilder, Linear
    from edgelmm.export.onnx_weights import nbits_from_gptq
    from edgelmm.export.quantize import rtn_quantize

    n, torch_gen = 64, torch.Generator().manual_seed(0)
    result = rtn_quantize(torch.randn(n, k, generator=torch_gen), 4, group, sym=not asym)
    g = result.g_idx.long()
    w = (result.scales[g] * (result.intweight - result.zeros[g]).float()).t()  # [N, K], §1.5
    fmt = "gptq_v2" if asym else "gptq"
    lin = Linear(k, n, nbits=nbits_from_gptq(result.pack(4, fmt), 4, fmt))
    builder = GraphBuilder("one_linear")
    x_name = builder.input("x", onnx.TensorProto.FLOAT, [3, k])
    builder.node("Identity", [builder.linear(x_name, lin, "lin")], outputs=["y"])
    builder.output("y", onnx.TensorProto.FLOAT, [3, n])
    session = ort.InferenceSession(builder.model().SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, k, generator=torch_gen)
    ours = session.run(None, {"x": x.numpy()})[0]
    expected = (x.double() @ w.double().t()).numpy()
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()


DECODER_CASES = {  # config overrides, TinyGPT-V's extra norms, whether GroupQueryAttention fuses the rotary
    "unfused-rotary": ({"num_attention_heads": 4}, False, False),
    "tinygpt-v": ({"num_attention_heads": 2, "partial_rotary_factor": 0.5}, True, True),
    "tinygpt-v-unfused-rotary": ({"num_attention_heads": 4}, True, False),
}


@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_graph_matches_torch(case):
    """Decoders the CPU graph builds in special ways match the torch TextModel through cached decode steps:
    rotary widths GroupQueryAttention cannot fuse (rotary_dim/2 not a multiple of 8: RotaryEmbedding on the
    slice), and TinyGPT-V's modified Phi-2 (LayerNorm over each head's q and k, RMSNorm after attention)."""
    import onnxruntime as ort

    overrides, tinygptv, fused = DECODER_CASES[case]
    cfg = TextConfig.from_hf({**TINY["phi"], "vocab_size": 64, "hidden_size": 64, **overrides}, "phi")
    cfg.qk_layernorm = cfg.post_attention_rmsnorm = tinygptv
    assert fused_rotary(cfg) == fused
    torch.manual_seed(0)
    text = TextModel(cfg).eval()
    with torch.no_grad():
        for name, p in text.named_parameters():
            if "norm" in name:  # gains near 1, small biases: the norms must matter
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape))
    bind_kernels(text, "cpu")
    graph = build_decoder(cfg, decoder_linears(text, []), decoder_norms(text))
    ops = {n.op_type for n in graph.graph.node}
    assert ("RotaryEmbedding" in ops) != fused
    made_by = {out: n for n in graph.graph.node for out in n.output}
    last_o = [n for n in graph.graph.node if n.name.startswith(f"layers.{cfg.num_layers - 1}.o/") and n.op_type != "Add"]
    assert len(last_o) == 1 and made_by[last_o[0].input[0]].op_type == "Slice"  # past attention: one position
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    embeds = torch.randn(1, 7, cfg.hidden_size)
    with torch.no_grad():
        ref = text(embeds, KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 8), 0, last_only=False)[0]
        if tinygptv:  # the extra norms change the result
            plain = TextModel(dataclasses.replace(cfg, qk_layernorm=False, post_attention_rmsnorm=False)).eval()
            plain.load_state_dict(text.state_dict(), strict=False)
            bind_kernels(plain, "cpu")
            other = plain(embeds, KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 8), 0, last_only=False)[0]
            assert (other - ref).abs().max() > 0.1 * ref.abs().max()
    empty = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    past = {f"past_key_values.{i}.{kv}": empty for i in range(cfg.num_layers) for kv in ("key", "value")}
    for start, end in ((0, 5), (5, 6), (6, 7)):
        feed = {"inputs_embeds": embeds[:, start:end].numpy(), "attention_mask": np.ones((1, end), np.int64), **past}
        result = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        assert np.abs(result["logits"][0, -1] - ref[end - 1].numpy()).max() / ref.abs().max() < 1e-4
        past = {k: result[k.replace("past_key_values", "present")] for k in past}


@pytest.mark.parametrize("family", ["llava-gemma", "tinygpt-v"])
def test_cli_export_runs_without_torch(tiny_checkpoint, tmp_path, family):
    src, out = tiny_checkpoint(family), tmp_path / "cli-onnx"
    assert cli_main(["export", str(src), "--format", "onnx", "--bits", "4", "--method", "rtn", "--block-size", "32",
                     "-o", str(out), "--quiet"]) == 0
    script = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from edgelmm import EdgeLMM
        image = (np.arange(64 * 64 * 3) % 255).astype(np.uint8).reshape(64, 64, 3)
        model = EdgeLMM.load({str(out)!r})
        result = model.generate(image, "What is in the picture?", max_new_tokens=4)
        assert type(model.backend).__name__ == "OnnxBackend"
        from edgelmm.plan.memory import PlanSettings
        from edgelmm.plan.sources import plan_for
        assert plan_for({str(out)!r}, PlanSettings()).parts["decoder graph"] > 0  # planning is torch-free too
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print("tokens", len(result.token_ids))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("tokens")


def test_cuda_target_graphs_are_fp16(tiny_checkpoint, tmp_path):
    out = export_onnx(tiny_checkpoint("tinyllava", "old", "qwen2"), tmp_path / "cuda", RTN4, target="cuda",
                      progress=False)
    for graph in GRAPHS:
        onnx.checker.check_model(str(out / graph))
    decoder = onnx.load(str(out / "decoder.onnx")).graph
    assert decoder.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert json.loads((out / CONFIG_NAME).read_text())["edgelmm"]["io_dtype"] == "float16"
    assert "DynamicQuantizeMatMul" not in _ops(out, "vision.onnx")  # int8 vision is CPU-only
    with pytest.raises(ConfigError, match="vision-bits 8"):
        export_onnx(tmp_path, tmp_path / "never", RTN4, target="cuda", vision_bits=8, progress=False)
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="choose one"):
        export_onnx(tmp_path, tmp_path / "never", dataclasses.replace(RTN4, quantize_vision=True), vision_bits=8,
                    progress=False)


def test_benchmark_runs_on_tiny_shape(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "onnx_decode.py"
    proc = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--prompt-tokens", "32",
                           "--new-tokens", "8", "--model-dir", str(tmp_path)], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for field in ("decode_tok_s", "ttft_s", "peak_rss_gb", "weights_gb", "bandwidth_gbs_before", "profile"):
        assert field in result
    assert result["decode_tok_s"] > 0 and result["profile"]["decode"]["ops"]


def _resident_kb(path: Path) -> int:
    """Resident KB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise")
def test_mapped_pages_release_keeps_the_data(tmp_path):
    """MappedPages.release drops a private file mapping's pages from the resident set (as the embedding table's
    after each lookup), and reading them again gives the same values."""
    from edgelmm.backends.onnx.backend import MappedPages

    path = (tmp_path / "table.data").resolve()
    values = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MB
    values.tofile(path)
    table = np.memmap(path, np.float32, mode="c")  # private, as onnxruntime maps external weights
    assert float(table.sum()) == pytest.approx(float(values.sum()), rel=1e-4)
    assert _resident_kb(path) >= 4000
    pages = MappedPages(path)
    assert len(pages.ranges) == 1
    pages.release()
    assert _resident_kb(path) < 100
    assert np.array_equal(np.asarray(table[::997]), values[::997])
