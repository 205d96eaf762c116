"""edgelmm's onnxruntime 4/8-bit matmul op (edgelmm/ort_ops) against onnxruntime's own MatMulNBits (accuracy
level 4, the same int8-activation numerics) and the dequantization formula; the graph rewrite; exported
decoders on the op against onnxruntime's kernel; and the fallbacks."""
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference import sample_image

from edgelmm import EdgeLMM
from edgelmm.backends.onnx import ops as ort_ops
from edgelmm.backends.onnx.backend import decoder_session
from edgelmm.errors import ConfigError
from edgelmm.export.gptq_settings import QuantSettings
from edgelmm.export.onnx_export import export_onnx
from edgelmm.plan.sources import plan_onnx_export

needs_ops = pytest.mark.skipif(ort_ops.unavailable_reason() is not None,
                               reason=f"edgelmm's CPU ops are unavailable here: {ort_ops.unavailable_reason()}")


def _weights(rng, n, k, block, zero_points, bits=4):
    """Random MatMulNBits weights and their dequantized fp64 matrix W [N, K] (docs/quant-formats.md §3.1): 4-bit
    codes two per byte (low nibble first), zero points packed the same way per row, default 8; 8-bit one byte
    each, default 128."""
    levels = 1 << bits
    codes = rng.integers(0, levels, (n, k), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (n, k // block)).astype(np.float32)
    zeros = (rng.integers(0, levels, (n, k // block), dtype=np.uint8) if zero_points
             else np.full((n, k // block), levels // 2))
    w = (codes - np.repeat(zeros, block, 1).astype(np.float64)) * np.repeat(scales, block, 1)
    if bits == 8:
        return codes.reshape(n, k // block, block), scales, zeros.reshape(-1) if zero_points else None, w
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k // block, block // 2)
    padded = np.zeros((n, -(-zeros.shape[1] // 2) * 2), np.uint8)
    padded[:, :zeros.shape[1]] = zeros
    zp = (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1) if zero_points else None
    return packed, scales, zp, w


def _dequantize(packed, scales, zp, block):
    """W [N, K] (fp64) of 4-bit MatMulNBits weights, by the formula of docs/quant-formats.md §3.1 (low nibble first,
    zero points packed the same way per row, default 8)."""
    def nibbles(b):
        return np.stack([b & 15, b >> 4], -1).reshape(b.shape[0], -1)

    n, blocks = scales.shape
    codes = nibbles(packed.reshape(n, -1))
    zeros = nibbles(zp.reshape(n, -1))[:, :blocks] if zp is not None else np.full((n, blocks), 8)
    return (codes - np.repeat(zeros, block, 1).astype(np.float64)) * np.repeat(scales, block, 1)


def _node_model(domain, x_shape, n, k, block, packed, scales, zp, bias, level=4, g_idx=False,
                bits=4) -> onnx.ModelProto:
    inputs = ["x", "b", "s", "z" if zp is not None else "", "g" if g_idx else "", "bias" if bias is not None else ""]
    while not inputs[-1]:
        inputs.pop()
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")]
    inits += [numpy_helper.from_array(zp, "z")] if zp is not None else []
    inits += [numpy_helper.from_array(bias, "bias")] if bias is not None else []
    inits += [numpy_helper.from_array(np.arange(k, dtype=np.int32) // block, "g")] if g_idx else []
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain=domain, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return _model(graph, edgelmm_domain=domain == ort_ops.DOMAIN)


def _model(graph, edgelmm_domain: bool = False) -> onnx.ModelProto:
    """A ModelProto of ``graph`` with the standard and com.microsoft opsets (and edgelmm's), IR version 10."""
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets + ([helper.make_opsetid(ort_ops.DOMAIN, 1)]
                                                             if edgelmm_domain else []))
    model.ir_version = 10
    return model


def _set_outputs(model: onnx.ModelProto, output: str, second_use: str | None = None) -> onnx.ModelProto:
    """The model's graph output becomes ``output``; ``second_use``: a Relu (also a graph output) reads that
    tensor too."""
    del model.graph.output[:]
    outputs = [output]
    if second_use:
        model.graph.node.append(helper.make_node("Relu", [second_use], ["relu"]))
        outputs.append("relu")
    model.graph.output.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs])
    return model


def _run(model: bytes, x, custom: bool):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if custom:
        opts.register_custom_ops_library(str(ort_ops.library()))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


# rows (1 = the GEMV), K, N, block, zero points, bias: K below / not a multiple of the 128-k GEMV chunk, column
# counts that leave partial 16-column panels and 64-column tiles, row counts that leave 1-4 rows after the
# 4-bit assembly kernel's groups of 5 (or 3 of the C kernel's), blocks of 16 k (2 steps a block) through it,
# K above the GEMM's 4096-deep panels, N wider than 8 column tiles, an odd number of blocks with zero points;
# 8-bit (the LM head's default): K not a multiple of its 64-k GEMV chunk, blocks 16..256, K above its 2048-deep
# panels, with and without zero points
@needs_ops
@pytest.mark.parametrize("bits,rows,k,n,block,zero_points,bias", [
    (4, 1, 64, 48, 32, False, False), (4, 1, 384, 130, 64, True, False), (4, 1, 2560, 300, 128, False, True),
    (4, 1, 256, 40, 16, True, True), (4, 1, 512, 20, 256, False, False), (4, 5, 512, 100, 32, True, True),
    (4, 67, 640, 200, 128, False, True), (4, 130, 1152, 96, 64, True, False), (4, 2, 192, 17, 16, False, False),
    (4, 5, 5120, 300, 128, False, True), (4, 3, 96, 260, 32, True, True), (4, 1, 96, 40, 32, True, False),
    (8, 1, 2560, 300, 128, False, True), (8, 1, 80, 40, 16, True, False), (8, 1, 96, 33, 32, False, False),
    (8, 1, 512, 64, 256, True, True), (8, 7, 640, 130, 64, True, True), (8, 67, 2560, 200, 128, False, False),
    (8, 4, 4352, 80, 128, True, False), (8, 2, 96, 17, 32, False, True),
    (4, 9, 256, 100, 16, False, False), (4, 13, 640, 200, 32, False, True)])
def test_matches_onnxruntime_matmulnbits(bits, rows, k, n, block, zero_points, bias):
    rng = np.random.default_rng(rows * 1000 + k + n)
    packed, scales, zp, w = _weights(rng, n, k, block, zero_points, bits)
    b = rng.standard_normal(n).astype(np.float32) if bias is not None and bias else None
    x = rng.standard_normal((1, rows, k)).astype(np.float32)
    x[0, :, 3] *= 20  # an outlier channel: per-block activation scales must stay per block
    ours = _run(_node_model(ort_ops.DOMAIN, ["a", "m", k], n, k, block, packed, scales, zp, b, bits=bits)
                .SerializeToString(), x, custom=True)
    theirs = _run(_node_model("com.microsoft", ["a", "m", k], n, k, block, packed, scales, zp, b, bits=bits)
                  .SerializeToString(), x, custom=False)
    exact = x[0].astype(np.float64) @ w.T + (b if b is not None else 0)
    assert ours.shape == theirs.shape == (1, rows, n)
    scale = np.abs(exact).max()
    assert np.abs(ours - theirs).max() < 1e-5 * scale  # same int8 numerics (2e-7 measured)
    assert np.abs(ours[0] - exact).max() < 3e-2 * scale  # int8 activations vs the fp64 formula


def test_rewrite_moves_only_eligible_nodes():
    """4- or 8-bit, accuracy level 4, block dividing K, no g_idx: moved; the rest of the model byte-for-byte
    kept."""
    rng = np.random.default_rng(0)
    packed, scales, _, _ = _weights(rng, 32, 128, 32, False)
    variants = {"eligible": {}, "fp32 compute": {"level": 0}, "g_idx": {"g_idx": True}}
    for name, extra in variants.items():
        model = _node_model("com.microsoft", [1, 128], 32, 128, 32, packed, scales, None, None, **extra)
        rewritten, moved = ort_ops.rewrite_model(model.SerializeToString())
        assert moved == (name == "eligible"), name
        parsed = onnx.load_from_string(rewritten)
        if moved:
            assert parsed.graph.node[0].domain == ort_ops.DOMAIN
            assert (ort_ops.DOMAIN, 1) in {(o.domain, o.version) for o in parsed.opset_import}
            parsed.graph.node[0].domain = "com.microsoft"
            del parsed.opset_import[-1]
        assert parsed == model
    deep = _node_model("com.microsoft", [1, 4096], 32, 4096, 4096, *_weights(rng, 32, 4096, 4096, False, 8)[:2],
                       None, None, bits=8)
    assert ort_ops.rewrite_model(deep.SerializeToString())[1] == 0  # an 8-bit block deeper than a GEMM panel
    for bits, moved in ((8, 1), (2, 0)):
        other = _node_model("com.microsoft", [1, 128], 32, 128, 32, packed, scales, None, None)
        next(a for a in other.graph.node[0].attribute if a.name == "bits").i = bits
        assert ort_ops.rewrite_model(other.SerializeToString())[1] == moved


@needs_ops
@pytest.mark.parametrize("llm", ["phi", "llama", "gemma", "qwen2"])
def test_exported_decoder_on_the_op_matches_onnxruntime(tiny_checkpoint, tmp_path, monkeypatch, llm):
    """A 4-bit export (CPU default: accuracy level 4) prefilled on edgelmm's ops (fp16 and int8 KV cache) and on
    onnxruntime's kernels (833 tokens: 729 image tokens + text): the same next token, and the logits far closer
    to each other than to the mirrored image's. Not bit-equal: float sums in another order flip a few int8
    roundings of the activations, which both kernels quantize per row and block (1e-3 .. 1e-2 after two tiny
    layers), and the caches round keys and values."""
    out = export_onnx(tiny_checkpoint("tinyllava", "old", llm), tmp_path / "onnx",
                      QuantSettings(bits=4, group_size=32, method="rtn"), progress=False)
    rewritten, moved = ort_ops.rewrite_model((out / "decoder.onnx").read_bytes())
    fused = {node.op_type for node in onnx.load_from_string(rewritten).graph.node if node.domain == ort_ops.DOMAIN}
    assert moved > 0 and ("GeluMlpNBits" in fused) == (llm == "phi")  # Phi's MLP runs as one op
    image = sample_image()
    logits = {}
    for ops, cache in (("1", "float16"), ("1", "int8"), ("0", "float32")):
        monkeypatch.setenv("EDGELMM_ORT_OPS", ops)
        monkeypatch.setenv("EDGELMM_ONNX_KV", cache)
        model = EdgeLMM.load(out)
        cache_types = {i.type for i in model.backend.decoder.session.get_inputs() if i.name.startswith("past")}
        assert cache_types == {f"tensor({'float' if cache == 'float32' else cache})"}  # which kernels ran
        assert model.backend.decoder_kernels == ("edgelmm" if ops == "1" else "onnxruntime")
        _, ids = model.prompt_ids("What is in the picture?")
        logits[cache] = [model.backend.prefill(ids, model.backend.encode_image(model.pixels(img)))
                         for img in (image, image.transpose(0))]  # PIL FLIP_LEFT_RIGHT
    theirs, theirs_mirrored = logits["float32"]
    image_effect = np.linalg.norm(theirs_mirrored - theirs)
    # measured gaps (of the logits' norm / of the image's effect): fp16 cache 1.0-1.4% / 1.6-2.3%, int8
    # cache 2.1-3.4% / 2.3-4.7%; an int8 cache may flip near-tied tokens (Gemma's mirrored image), so its
    # check is the gap on both images
    for cache, of_norm in (("float16", 0.03), ("int8", 0.05)):
        ours, ours_mirrored = logits[cache]
        gap = np.linalg.norm(ours - theirs)
        assert gap < of_norm * np.linalg.norm(theirs) and gap < 0.1 * image_effect, cache
        assert np.linalg.norm(ours_mirrored - theirs_mirrored) < 0.1 * image_effect, cache
        assert ours.argmax() == theirs.argmax(), cache
        assert cache == "int8" or ours_mirrored.argmax() == theirs_mirrored.argmax()


def test_off_switch_and_build_failure_fall_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGELMM_ORT_OPS", "0")
    assert "EDGELMM_ORT_OPS" in ort_ops.unavailable_reason() and ort_ops.library() is None
    monkeypatch.setenv("EDGELMM_ORT_OPS", "1")
    monkeypatch.setenv("EDGELMM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    ort_ops._build.cache_clear()
    try:
        assert ort_ops.library() is None
        if ort_ops.unavailable_reason() is None:  # a CPU the ops run on: the failed build is reported
            assert "could not build edgelmm's CPU ops" in capsys.readouterr().err
        else:  # a CPU without their instructions: nothing is built, the reason says why
            assert "the CPU lacks" in ort_ops.unavailable_reason()
        rng = np.random.default_rng(1)
        packed, scales, _, w = _weights(rng, 32, 128, 32, False)
        path = tmp_path / "node.onnx"
        onnx.save(_node_model("com.microsoft", [1, 1, 128], 32, 128, 32, packed, scales, None, None), str(path))
        session, edgelmm_ops = decoder_session(path, ["CPUExecutionProvider"], threads=1, edgelmm_ops=True)
        assert not edgelmm_ops  # fell back to onnxruntime's kernel
        x = rng.standard_normal((1, 1, 128)).astype(np.float32)
        assert np.abs(session.run(None, {"x": x})[0][0] - x[0] @ w.T).max() < 3e-2 * np.abs(x[0] @ w.T).max()
    finally:
        ort_ops._build.cache_clear()


@needs_ops
def test_plan_counts_the_cache_the_runtime_allocates(tiny_checkpoint, tmp_path, monkeypatch):
    """``EDGELMM_ONNX_KV`` picks the cache of edgelmm's attention op; the memory plan counts what the loaded
    runtime really allocates for it (int8 rows carry their scale), and an unknown dtype is a ConfigError."""
    out = export_onnx(tiny_checkpoint("tinyllava", "old", "phi"), tmp_path / "onnx",
                      QuantSettings(bits=4, group_size=32, method="rtn"), progress=False)
    sizes = {}
    for cache in ("float32", "float16", "int8"):
        monkeypatch.setenv("EDGELMM_ONNX_KV", cache)
        model = EdgeLMM.load(out, context_length=96)
        allocated = sum(np.prod(v.shape()) * {"tensor(float)": 4, "tensor(float16)": 2, "tensor(int8)": 1}[v.data_type()]
                        for pair in model.backend.decoder.kv for v in pair)
        assert plan_onnx_export(out, context=96).parts["kv cache"] == allocated, cache
        sizes[cache] = allocated
    text = model.spec.text  # the plan and the runtime share ort_ops.cache_row_elements: each size by hand too
    rows = 2 * text.num_layers * text.num_kv_heads * 96
    assert sizes["int8"] == rows * (text.head_dim + 4)
    assert sizes["float16"] == rows * text.head_dim * 2
    assert sizes["float32"] == 2 * sizes["float16"]
    monkeypatch.setenv("EDGELMM_ONNX_KV", "int4")
    with pytest.raises(ConfigError, match="EDGELMM_ONNX_KV"):
        EdgeLMM.load(out)


def _gelu_model(rows, k, n, block, bits, extra_use=None) -> onnx.ModelProto:
    """MatMulNBits (with bias) -> com.microsoft FastGelu, as the exporter writes Phi's fc1; ``extra_use``
    "output": the matmul's output is also a graph output, "node": another node reads it too."""
    rng = np.random.default_rng(rows + bits)
    packed, scales, zp, _ = _weights(rng, n, k, block, True, bits)
    model = _node_model("com.microsoft", [1, rows, k], n, k, block, packed, scales, zp,
                        rng.standard_normal(n).astype(np.float32), bits=bits)
    model.graph.node.append(helper.make_node("FastGelu", ["y"], ["act"], domain="com.microsoft"))
    _set_outputs(model, "act", "y" if extra_use == "node" else None)
    if extra_use == "output":
        model.graph.output.extend([helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return model


@needs_ops
@pytest.mark.parametrize("bits,rows,k", [(4, 1, 256), (4, 70, 256), (8, 1, 256), (8, 5, 256),
                                         (4, 5, 5120), (8, 4, 2560)])  # the last two: K in two chunks
def test_fastgelu_fused_into_the_matmul(bits, rows, k):
    """The rewrite fuses MatMulNBits -> FastGelu into one op (Phi's fc1); its output matches onnxruntime's two
    nodes (GEMV and GEMM, both tails of the activation, applied once after the last K chunk); a matmul output
    used elsewhere is not fused."""
    model = _gelu_model(rows, k, 100, 32, bits)
    rewritten, moved = ort_ops.rewrite_model(model.SerializeToString())
    parsed = onnx.load_from_string(rewritten)
    assert moved == 1 and [n.op_type for n in parsed.graph.node] == ["MatMulNBits"]
    assert parsed.graph.node[0].output == ["act"]
    assert helper.get_attribute_value(next(a for a in parsed.graph.node[0].attribute if a.name == "gelu_tanh")) == 1
    x = np.random.default_rng(3).standard_normal((1, rows, k)).astype(np.float32) * 3  # gelu's two tails
    ours = _run(rewritten, x, custom=True)
    theirs = _run(model.SerializeToString(), x, custom=False)
    assert (theirs < -1e-3).any() and (theirs > 1).any()
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(theirs).max()
    for use in ("output", "node"):
        kept = onnx.load_from_string(ort_ops.rewrite_model(_gelu_model(rows, k, 100, 32, bits, use)
                                                           .SerializeToString())[0])
        assert [n.op_type for n in kept.graph.node][:2] == ["MatMulNBits", "FastGelu"], use


def _mlp_model(rows, k, n, bits, down_bits, down_block, zero_points, extra_use=None) -> onnx.ModelProto:
    """Phi's MLP as the exporter writes it: MatMulNBits (fc1, K -> N, bias) -> com.microsoft FastGelu ->
    MatMulNBits (fc2, N -> K); ``extra_use`` "node": another node reads the FastGelu's output too."""
    rng = np.random.default_rng(rows + n + down_bits)
    model = _gelu_model(rows, k, n, 32, bits)
    packed, scales, zp, _ = _weights(rng, k, n, down_block, zero_points, down_bits)
    inits = [numpy_helper.from_array(packed, "b2"), numpy_helper.from_array(scales, "s2"),
             numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "bias2")]
    inits += [numpy_helper.from_array(zp, "z2")] if zp is not None else []
    model.graph.initializer.extend(inits)
    model.graph.node.append(helper.make_node(
        "MatMulNBits", ["act", "b2", "s2", "z2" if zp is not None else "", "", "bias2"], ["out"],
        domain="com.microsoft", K=n, N=k, bits=down_bits, block_size=down_block, accuracy_level=4))
    return _set_outputs(model, "out", "act" if extra_use == "node" else None)


# rows: the GEMV, a few rows, more than 64 (rows quantized in parallel); N: one partial 1024-column chunk, one
# full and one partial chunk; 8-bit fc2 with zero points; 256-deep fc2 blocks; 2048-deep ones, wider than a
# chunk (onnxruntime's kernel stops at 256: checked against edgelmm's two ops only)
@needs_ops
@pytest.mark.parametrize("rows,k,n,bits,down_bits,down_block,zero_points", [
    (1, 256, 1152, 4, 4, 128, False), (5, 128, 320, 4, 4, 32, True), (70, 256, 1152, 4, 4, 64, False),
    (3, 160, 2176, 8, 8, 128, True), (4, 128, 1280, 4, 4, 256, False), (6, 64, 6144, 4, 4, 2048, False)])
def test_mlp_fused_into_one_op(rows, k, n, bits, down_bits, down_block, zero_points):
    """The rewrite fuses MatMulNBits -> FastGelu -> MatMulNBits (Phi's MLP) into one GeluMlpNBits, which makes
    the intermediate activations a task's columns at a time (128, or a down block when wider; the last task
    partial): bit-identical to edgelmm's two ops (the FastGelu fused into the first), and matching
    onnxruntime's three nodes. An activation read by another node
    is not fused (the FastGelu is, into the first matmul)."""
    model = _mlp_model(rows, k, n, bits, down_bits, down_block, zero_points)
    rewritten, moved = ort_ops.rewrite_model(model.SerializeToString())
    parsed = onnx.load_from_string(rewritten)
    assert moved == 1 and [(node.op_type, node.domain) for node in parsed.graph.node] == [("GeluMlpNBits", "edgelmm")]
    assert list(parsed.graph.node[0].input) == ["x", "b", "s", "z", "", "bias", "b2", "s2",
                                                "z2" if zero_points else "", "", "bias2"]
    x = np.random.default_rng(5).standard_normal((1, rows, k)).astype(np.float32) * 3
    ours = _run(rewritten, x, custom=True)
    unfused = ort_ops.rewrite_model(_mlp_model(rows, k, n, bits, down_bits, down_block, zero_points, "node")
                                    .SerializeToString())[0]
    kept = onnx.load_from_string(unfused)
    assert [node.op_type for node in kept.graph.node][:2] == ["MatMulNBits", "MatMulNBits"]
    assert kept.graph.node[0].output == ["act"]
    assert np.array_equal(ours, _run(unfused, x, custom=True))
    if down_block > 256:  # beyond onnxruntime's kernel: the fp64 formula, int8 activations' error allowed
        init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        hidden = x[0].astype(np.float64) @ _dequantize(init["b"], init["s"], init["z"], 32).T + init["bias"]
        hidden = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden ** 3)))  # FastGelu
        exact = hidden @ _dequantize(init["b2"], init["s2"], None, down_block).T + init["bias2"]
        assert np.abs(ours[0] - exact).max() < 3e-2 * np.abs(exact).max()
        return
    theirs = _run(model.SerializeToString(), x, custom=False)
    assert ours.shape == theirs.shape == (1, rows, k)
    # the same int8 numerics, but float sums in another order flip a few roundings of the quantized activations
    # (1.3% of the outputs off by more than 1e-5, 2.6e-4 at most, measured on 70 rows; none on fewer)
    err = np.abs(ours - theirs) / np.abs(theirs).max()
    assert (err < 1e-5).mean() > 0.95 and err.max() < 1e-3


def _chain_model(widths: list[int], gelus: list[bool], rows: int) -> onnx.ModelProto:
    """MatMulNBits (4-bit, block 32) K=widths[i] -> N=widths[i+1], each followed by a FastGelu where gelus[i]."""
    rng = np.random.default_rng(len(widths))
    nodes, inits, name = [], [], "x"
    for i, (k, n) in enumerate(itertools.pairwise(widths)):
        packed, scales, _, _ = _weights(rng, n, k, 32, False)
        inits += [numpy_helper.from_array(packed, f"b{i}"), numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [name, f"b{i}", f"s{i}"], [f"mm{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=32, accuracy_level=4))
        name = f"mm{i}"
        if gelus[i]:
            nodes.append(helper.make_node("FastGelu", [name], [f"g{i}"], domain="com.microsoft"))
            name = f"g{i}"
    nodes.append(helper.make_node("Relu", [name], ["y"]))
    return _model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              [1, rows, widths[0]])],
                                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits))


@needs_ops
@pytest.mark.parametrize("gelus,fused", [
    ([True, True, False], ["GeluMlpNBits", "FastGelu", "MatMulNBits", "Relu"]),  # MLPs chained: one fused
    ([True, True], ["GeluMlpNBits", "FastGelu", "Relu"])])  # an MLP whose fc2 a FastGelu follows
def test_a_matmul_joins_one_fusion(gelus, fused):
    """A matmul that could end one MLP and start the next (or take a FastGelu) joins one fusion only: the
    rewritten graph still runs, and matches onnxruntime's nodes."""
    widths = [64, 128, 64, 96][:len(gelus) + 1]
    model = _chain_model(widths, gelus, 5)
    rewritten, _ = ort_ops.rewrite_model(model.SerializeToString())
    assert [node.op_type for node in onnx.load_from_string(rewritten).graph.node] == fused
    x = np.random.default_rng(2).standard_normal((1, 5, 64)).astype(np.float32)
    ours, theirs = _run(rewritten, x, custom=True), _run(model.SerializeToString(), x, custom=False)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


def _norm_model(op, x_shape, skip_shape, beta, bias, outputs) -> onnx.ModelProto:
    """One com.microsoft Skip(Simplified)LayerNormalization; ``outputs`` its output names ("" = absent)."""
    hidden = x_shape[-1]
    rng = np.random.default_rng(hidden)
    params = {"gamma": rng.uniform(0.5, 1.5, hidden), "beta": rng.standard_normal(hidden) if beta else None,
              "bias": rng.standard_normal(hidden) if bias else None}
    names = ["gamma"] + (["beta"] if op == "SkipLayerNormalization" else []) + ["bias"]
    inputs = ["x", "skip"] + [name if params[name] is not None else "" for name in names]
    while not inputs[-1]:
        inputs.pop()
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items() if v is not None]
    node = helper.make_node(op, inputs, outputs, domain="com.microsoft", epsilon=1e-5)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
                                            helper.make_tensor_value_info("skip", TensorProto.FLOAT, skip_shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o], inits)
    return _model(graph)


# one row (decode), many (rows split over threads), a hidden size with a 16-lane tail, a skip broadcast over
# the batch; all four outputs, only the first, and the exporter's use (output and sum, no statistics)
@needs_ops
@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
@pytest.mark.parametrize("x_shape,skip_shape,beta,bias,outputs", [
    ([1, 1, 64], [1, 1, 64], True, False, ["y"]), ([1, 70, 2560], [1, 70, 2560], True, True, ["y", "m", "s", "sum"]),
    ([1, 5, 100], [1, 5, 100], False, True, ["y", "", "", "sum"]), ([2, 3, 48], [1, 3, 48], True, False, ["y", "m", "s"])])
def test_skip_layer_norms_match_onnxruntime(op, x_shape, skip_shape, beta, bias, outputs):
    model = _norm_model(op, x_shape, skip_shape, beta, bias, outputs)
    rewritten, moved = ort_ops.rewrite_model(model.SerializeToString())
    assert moved == 1 and onnx.load_from_string(rewritten).graph.node[0].domain == ort_ops.DOMAIN
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32) * 2 + 1,
             "skip": rng.standard_normal(skip_shape).astype(np.float32)}
    runs = []
    for data, custom in ((rewritten, True), (model.SerializeToString(), False)):
        opts = ort.SessionOptions()
        if custom:
            opts.register_custom_ops_library(str(ort_ops.library()))
        runs.append(ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, feeds))
    ours, theirs = runs
    assert len(ours) == len(theirs) == len([o for o in outputs if o])
    for name, a, b in zip([o for o in outputs if o], ours, theirs):
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() < 1e-5 * max(np.abs(b).max(), 1), name


@needs_ops
def test_an_empty_prompt_gives_empty_outputs():
    """Zero rows through the matmul, the fused MLP and the norm: empty outputs of onnxruntime's shapes, no
    error (an op's output with no elements has no data)."""
    x = np.zeros((1, 0, 128), np.float32)
    for model in (_mlp_model(0, 128, 320, 4, 4, 32, True),
                  _norm_model("SkipLayerNormalization", [1, "s", 128], [1, "s", 128], True, True, ["y", "", "", "sum"])):
        feeds = {"x": x, "skip": x} if len(model.graph.input) == 2 else {"x": x}
        runs = []
        for data, custom in ((ort_ops.rewrite_model(model.SerializeToString())[0], True),
                             (model.SerializeToString(), False)):
            opts = ort.SessionOptions()
            if custom:
                opts.register_custom_ops_library(str(ort_ops.library()))
            runs.append(ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, feeds))
        assert [a.shape for a in runs[0]] == [b.shape for b in runs[1]] and runs[0][0].size == 0
