"""edgelmm's GroupQueryAttention ops (edgelmm/backends/onnx/ops/gqa_*.c; fp32 cache, the fp16 cache the runtime uses,
and the int8 cache) against onnxruntime's own com.microsoft GroupQueryAttention (fp32) on the same inputs:
packed and separate q/k/v, fused partial rotary, grouped heads, a prompt, a chunk after a past, single-token
steps, and the shared past/present buffer the runtime binds."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgelmm.backends.onnx import ops as ort_ops

needs_ops = pytest.mark.skipif(ort_ops.unavailable_reason() is not None,
                               reason=f"edgelmm's CPU ops are unavailable here: {ort_ops.unavailable_reason()}")


CACHE_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
# (attention output, cache) errors, of the largest value: fp32 as onnxruntime (3e-6 measured); fp16 within its
# rounding (1.1e-3); int8: the cache within half a step of each row's max/127 (3.9e-3), the output through
# these tests' peaked softmax (logits of std ~4) 2.4e-2 at most
BOUNDS = {"float32": (2e-5, 2e-5), "float16": (3e-3, 3e-3), "int8": (3e-2, 0.5 / 127 * 1.01)}


def _to_cache(x, cache):
    """fp32 cache values [1, Hkv, P, D] in the op's format: int8 rows of D values quantized symmetrically to
    max|row| / 127, then that scale's 4 bytes (quant-formats' int8 KV layout, by numpy)."""
    if cache != "int8":
        return x.astype(np.float16 if cache == "float16" else np.float32)
    scale = np.abs(x).max(-1, keepdims=True).astype(np.float32) / 127
    q = np.rint(x / np.where(scale == 0, 1, scale)).clip(-127, 127).astype(np.int8)
    return np.concatenate([q, scale.view(np.int8)], -1)


def _from_cache(a, cache):
    """The fp32 values the op's cache holds."""
    if cache != "int8":
        return a.astype(np.float32)
    return a[..., :-4].astype(np.float32) * np.ascontiguousarray(a[..., -4:]).view(np.float32)


def _model(domain, heads, kv_heads, head_dim, packed, rotary_half, cache="float32", **attributes):
    width = (heads + 2 * kv_heads) * head_dim if packed else heads * head_dim
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [helper.make_tensor_value_info("query", f32, [1, "s", width])]
    names = ["query", "", ""]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, f32, [1, "s", kv_heads * head_dim]) for n in ("key", "value")]
        names = ["query", "key", "value"]
    cache_type, row = CACHE_TYPES[cache], head_dim + 4 if cache == "int8" else head_dim
    inputs += [helper.make_tensor_value_info(n, cache_type, [1, kv_heads, "p", row]) for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", i32, [1]), helper.make_tensor_value_info("total", i32, [])]
    names += ["past_key", "past_value", "seqlens_k", "total"]
    if rotary_half:
        inputs += [helper.make_tensor_value_info(n, f32, ["m", rotary_half]) for n in ("cos", "sin")]
        names += ["cos", "sin"]
    op_type = {"float32": "GroupQueryAttention", "float16": "GroupQueryAttentionHalfCache",
               "int8": "GroupQueryAttentionInt8Cache"}[cache]
    node = helper.make_node(op_type, names, ["out", "present_key", "present_value"], domain=domain,
                            num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(bool(rotary_half)), **attributes)
    outputs = [helper.make_tensor_value_info("out", f32, None)]
    outputs += [helper.make_tensor_value_info(n, cache_type, None) for n in ("present_key", "present_value")]
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=opsets + [helper.make_opsetid(ort_ops.DOMAIN, 1)])
    model.ir_version = 10
    return model


def _session(domain, heads, kv_heads, head_dim, packed, rotary_half, cache="float32"):
    model = _model(domain, heads, kv_heads, head_dim, packed, rotary_half, cache)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if domain == ort_ops.DOMAIN:
        opts.register_custom_ops_library(str(ort_ops.library()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(rng, heads, kv_heads, head_dim, packed, rotary_half, steps, past_len=0):
    """Feeds for consecutive runs of ``steps`` new tokens each, starting after ``past_len`` cached ones."""
    positions = past_len + sum(steps) + 1
    angles = np.arange(positions)[:, None] / 10000 ** (np.arange(rotary_half) / max(rotary_half, 1))
    rotary = {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)} if rotary_half else {}
    cache = rng.standard_normal((2, 1, kv_heads, past_len, head_dim)).astype(np.float32)
    total, feeds = past_len, []
    for s in steps:
        total += s
        width = (heads + 2 * kv_heads) * head_dim if packed else heads * head_dim
        feed = {"query": rng.standard_normal((1, s, width)).astype(np.float32) * 2,
                "seqlens_k": np.array([total - 1], np.int32), "total": np.array(total, np.int32), **rotary}
        if not packed:
            feed.update(key=rng.standard_normal((1, s, kv_heads * head_dim)).astype(np.float32) * 2,
                        value=rng.standard_normal((1, s, kv_heads * head_dim)).astype(np.float32))
        feeds.append(feed)
    return cache, feeds


CASES = [  # heads, kv heads, head dim, packed q|k|v, rotary_dim / 2 (0: none), steps, past
    (4, 4, 80, True, 16, [70, 1, 1], 0),    # Phi-2's layout: packed, 32 of 80 dims rotated
    (8, 2, 64, False, 0, [3, 1], 5),        # grouped heads, a chunk after a past, no rotary
    (2, 1, 48, False, 24, [33, 17, 1], 0),  # chunked prefill, rotary over the whole head
    (4, 2, 256, True, 8, [130, 1], 0),      # the largest head, more than 64 rows per head
    (4, 2, 40, False, 0, [9, 1], 3),        # a head size that is not a multiple of 16
]


@needs_ops
@pytest.mark.parametrize("cache", ["float32", "float16", "int8"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,packed,rotary_half,steps,past", CASES)
def test_matches_onnxruntime_gqa(heads, kv_heads, head_dim, packed, rotary_half, steps, past, cache):
    """fp32 cache: as onnxruntime to 2e-5; fp16 / int8 cache: within the rounding of the cached values."""
    rng = np.random.default_rng(heads * 100 + head_dim)
    past_kv, feeds = _feeds(rng, heads, kv_heads, head_dim, packed, rotary_half, steps, past)
    ours = _session(ort_ops.DOMAIN, heads, kv_heads, head_dim, packed, rotary_half, cache)
    theirs = _session("com.microsoft", heads, kv_heads, head_dim, packed, rotary_half)
    caches = {"ours": (_to_cache(past_kv[0], cache), _to_cache(past_kv[1], cache)), "theirs": tuple(past_kv)}
    for feed in feeds:
        results = {}
        for name, session in (("ours", ours), ("theirs", theirs)):
            k, v = caches[name]
            results[name] = session.run(None, {**feed, "past_key": k, "past_value": v})
            caches[name] = results[name][1], results[name][2]
        assert [a.dtype for a in results["ours"]] == [np.float32] + 2 * [caches["ours"][0].dtype]
        out, *present = results["ours"]
        for a, b, bound in zip([out, *(_from_cache(p, cache) for p in present)], results["theirs"],
                               [BOUNDS[cache][0], BOUNDS[cache][1], BOUNDS[cache][1]]):
            assert a.shape == b.shape
            assert np.abs(a - b).max() < bound * np.abs(b).max()


@needs_ops
@pytest.mark.parametrize("cache", ["float32", "float16", "int8"])
def test_shared_buffer_is_written_in_place(cache):
    """The runtime binds one preallocated buffer as past and present: the op appends in place and reads it."""
    heads, kv_heads, head_dim, half, buffer = 4, 2, 64, 16, 48
    rng = np.random.default_rng(7)
    _, feeds = _feeds(rng, heads, kv_heads, head_dim, True, half, [20, 1, 1])
    outputs = {}
    for domain in (ort_ops.DOMAIN, "com.microsoft"):
        ours = domain == ort_ops.DOMAIN
        session = _session(domain, heads, kv_heads, head_dim, True, half, cache if ours else "float32")
        k, v = (ort.OrtValue.ortvalue_from_numpy(_to_cache(np.zeros((1, kv_heads, buffer, head_dim), np.float32),
                                                           cache if ours else "float32")) for _ in range(2))
        binding, outs = session.io_binding(), []
        binding.bind_ortvalue_input("past_key", k)
        binding.bind_ortvalue_input("past_value", v)
        for feed in feeds:
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            binding.clear_binding_outputs()  # "out" first: copy_outputs_to_cpu() keeps the binding order
            binding.bind_output("out")
            binding.bind_ortvalue_output("present_key", k)
            binding.bind_ortvalue_output("present_value", v)
            session.run_with_iobinding(binding)
            outs.append(binding.copy_outputs_to_cpu()[0])
        total = sum(f["query"].shape[1] for f in feeds)
        outputs[domain] = [*outs, *(_from_cache(c.numpy()[:, :, :total], cache if ours else "float32") for c in (k, v))]
    for i, (a, b) in enumerate(zip(outputs[ort_ops.DOMAIN], outputs["com.microsoft"])):
        bound = BOUNDS[cache][0] if i < len(feeds) else BOUNDS[cache][1]  # the step outputs, then the caches
        assert np.abs(a - b).max() < bound * np.abs(b).max()


def test_rewrite_moves_plain_attention_and_retypes_its_cache():
    """GroupQueryAttention without the features the op lacks moves (an explicit default -1 window included),
    its past/present become float16 with the fp16-cache op; softcap keeps a node with onnxruntime."""
    model = _model("com.microsoft", 4, 2, 64, True, 16, local_window_size=-1)
    rewritten, moved = ort_ops.rewrite_model(model.SerializeToString(), "float16")
    parsed = onnx.load_from_string(rewritten)
    assert moved == 1 and parsed.graph.node[0].op_type == "GroupQueryAttentionHalfCache"
    assert parsed.graph.node[0].domain == ort_ops.DOMAIN
    types = {v.name: v.type.tensor_type.elem_type for v in [*parsed.graph.input, *parsed.graph.output]}
    assert {n for n, t in types.items() if t == TensorProto.FLOAT16} == {"past_key", "past_value", "present_key",
                                                                         "present_value"}
    fp32, moved = ort_ops.rewrite_model(model.SerializeToString(), "float32")
    assert moved == 1 and onnx.load_from_string(fp32).graph.node[0].op_type == "GroupQueryAttention"
    assert onnx.load_from_string(fp32).graph.input == model.graph.input
    softcap = _model("com.microsoft", 4, 2, 64, True, 16, softcap=30.0)
    assert ort_ops.rewrite_model(softcap.SerializeToString())[1] == 0
    int8, moved = ort_ops.rewrite_model(model.SerializeToString(), "int8")
    parsed = onnx.load_from_string(int8)
    assert moved == 1 and parsed.graph.node[0].op_type == "GroupQueryAttentionInt8Cache"
    for value in [*parsed.graph.input, *parsed.graph.output]:
        if value.name.startswith(("past", "present")):  # int8 rows of values + scale: a symbolic last dim
            assert value.type.tensor_type.elem_type == TensorProto.INT8
            assert value.name.startswith("present") or value.type.tensor_type.shape.dim[-1].dim_param == "cache_row"


def _projected_model(heads, kv_heads, head_dim, rotary_half, k, seed, also_output_qkv=False) -> onnx.ModelProto:
    """x [1, s, k] -> MatMulNBits (4-bit, block 32, bias) -> packed q|k|v -> com.microsoft GroupQueryAttention;
    ``also_output_qkv``: the projection is a graph output too (then nothing is fused)."""
    rng = np.random.default_rng(seed)
    n = (heads + 2 * kv_heads) * head_dim
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k // 32, 16)
    scales = rng.uniform(0.02, 0.05, (n, k // 32)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) * 0.1
    model = _model("com.microsoft", heads, kv_heads, head_dim, True, rotary_half)
    graph = model.graph
    graph.initializer.extend([onnx.numpy_helper.from_array(a, name)
                              for a, name in ((packed, "qkv_b"), (scales, "qkv_s"), (bias, "qkv_bias"))])
    graph.node.insert(0, helper.make_node("MatMulNBits", ["x", "qkv_b", "qkv_s", "", "", "qkv_bias"], ["query"],
                                          domain="com.microsoft", K=k, N=n, bits=4, block_size=32, accuracy_level=4))
    graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k]))
    if also_output_qkv:
        graph.output.append(helper.make_tensor_value_info("query", TensorProto.FLOAT, None))
    return model


def _run_steps(model: bytes, custom: bool, feeds, caches):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if custom:
        opts.register_custom_ops_library(str(ort_ops.library()))
    session, results = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]), []
    for feed in feeds:
        out = session.run(["out", "present_key", "present_value"], {**feed, "past_key": caches[0], "past_value": caches[1]})
        caches = out[1], out[2]
        results.append(out)
    return results


PROJECTED = [  # heads, kv heads, head dim, rotary_dim / 2, prompt: one group of q|k|v columns or several
    (4, 4, 80, 16, 70),     # Phi-2's layout, short: all heads' columns at once
    (8, 8, 80, 16, 300),    # Phi-2's layout, 300 rows: two groups of 4 heads (320 columns of each of q, k, v)
    (6, 6, 80, 16, 400),    # groups of 4 and 2 heads: 160-column ranges, GEMM tiles across two ranges
    (8, 2, 64, 0, 1100),    # grouped heads: two groups of one kv head and its 4 query heads
]


@needs_ops
@pytest.mark.parametrize("cache", ["float32", "float16", "int8"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_half,prompt", PROJECTED)
def test_qkv_projection_fused_with_attention(heads, kv_heads, head_dim, rotary_half, prompt, cache):
    """A MatMulNBits read only as a GroupQueryAttention's packed query becomes one QkvGroupQueryAttention, which
    makes the prompt's q|k|v a few heads' columns at a time: bit-identical to edgelmm's two ops (a prompt, then
    two single tokens), and close to onnxruntime's two nodes."""
    k = 128
    fused, moved = ort_ops.rewrite_model(_projected_model(heads, kv_heads, head_dim, rotary_half, k, 3)
                                         .SerializeToString(), cache)
    nodes = onnx.load_from_string(fused).graph.node
    assert moved == 1 and [n.op_type for n in nodes] == ["Qkv" + ort_ops.CACHE_OPS[cache][0]]
    unfused, moved = ort_ops.rewrite_model(_projected_model(heads, kv_heads, head_dim, rotary_half, k, 3, True)
                                           .SerializeToString(), cache)
    assert moved == 2 and [n.op_type for n in onnx.load_from_string(unfused).graph.node] == [
        "MatMulNBits", ort_ops.CACHE_OPS[cache][0]]
    rng = np.random.default_rng(11)
    _, feeds = _feeds(rng, heads, kv_heads, head_dim, True, rotary_half, [prompt, 1, 1, 0])
    for feed in feeds:
        feed["x"] = rng.standard_normal((1, feed.pop("query").shape[1], k)).astype(np.float32)
    empty = _to_cache(np.zeros((1, kv_heads, 0, head_dim), np.float32), cache)
    ours = _run_steps(fused, True, feeds, (empty, empty))
    for a, b in zip(ours, _run_steps(unfused, True, feeds, (empty, empty))):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert ours[-1][0].shape == (1, 0, heads * head_dim)  # no new rows (onnxruntime's kernel refuses them)
    ours, feeds = ours[:-1], feeds[:-1]
    theirs = _run_steps(_projected_model(heads, kv_heads, head_dim, rotary_half, k, 3).SerializeToString(), False,
                        feeds, (np.zeros((1, kv_heads, 0, head_dim), np.float32),) * 2)
    # bounds: BOUNDS', but the projection's int8 sums in another order (~1e-5 more than fp32's); and with the
    # int8 cache, these projections' sharper softmax (3.3e-2 of the output's max measured, 6 heads) than BOUNDS'
    out_bound = {"float32": 1e-4, "float16": BOUNDS["float16"][0], "int8": 5e-2}[cache]
    for a, b in zip(ours, theirs):
        for x, y, bound in zip([a[0], *(_from_cache(c, cache) for c in a[1:])], b, [out_bound] + 2 * [BOUNDS[cache][1]]):
            assert x.shape == y.shape
            assert np.abs(x - y).max() < max(bound, 1e-4) * np.abs(y).max()
