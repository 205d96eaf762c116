"""Int8 vision graphs on x86 CPUs without VNNI: the unsigned-weight rewrite against the int8 product computed
in numpy by DynamicQuantizeMatMul's formula (activations quantized to uint8 per tensor, int32 sums)."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgelmm.backends.onnx import ops as ort_ops
from edgelmm.backends.onnx.unsigned_int8 import needs_unsigned_weights, unsigned_weight_model, vision_model_source

M, K, N = 16, 256, 48


def reference(x: np.ndarray, q: np.ndarray, scales: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """DynamicQuantizeMatMul in float64: x to uint8 with its range (0 included), exact integer sums."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255
    zero = np.clip(np.rint(-low / scale), 0, 255)
    xq = np.clip(np.rint(x / scale) + zero, 0, 255)
    sums = (xq - zero).astype(np.int64) @ q.astype(np.int64)  # [M, N], exact
    return sums * scale * scales.astype(np.float64) + bias


def node_model(q: np.ndarray, scales: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(q, "w.qweight"), numpy_helper.from_array(scales, "w.scales"),
             numpy_helper.from_array(bias, "w.bias")]
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w.qweight", "w.scales", "", "w.bias"], ["y"],
                            domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("com.microsoft", 1)])


def run(model) -> np.ndarray:
    source = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


rng = np.random.default_rng(0)
X = (rng.standard_normal((M, K)) * 2 + 6).astype(np.float32)  # mostly large positive: uint8 values near 255
Q = np.where(rng.random((K, N)) < 0.5, 127, -127).astype(np.int8) * (rng.random((K, N)) < 0.9)  # large weights
SCALES = (rng.random(N) * 0.01 + 0.001).astype(np.float32)
BIAS = rng.standard_normal(N).astype(np.float32)


def test_unsigned_weights_compute_the_exact_int8_product(tmp_path):
    path = tmp_path / "vision.onnx"
    onnx.save(node_model(Q, SCALES, BIAS), str(path))
    model, rewritten = unsigned_weight_model(path)
    assert rewritten == 1
    node = model.graph.node[0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[node.input[1]].dtype == np.uint8 and (inits[node.input[3]] == 128).all()
    want = reference(X, Q, SCALES, BIAS)
    got = run(model)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    signed_error = np.abs(run(str(path)) - want).max()
    if needs_unsigned_weights(ort_ops.cpu_flags()):  # this CPU's signed kernel saturates on these inputs
        assert signed_error > 100 * np.abs(got - want).max()


def test_the_choice_follows_the_cpu_flags(tmp_path):
    assert needs_unsigned_weights({"avx2", "fma"}, "x86_64")
    assert not needs_unsigned_weights({"avx2", "avx_vnni"}, "x86_64")
    assert not needs_unsigned_weights({"avx512f", "avx512_vnni"}, "x86_64")
    assert not needs_unsigned_weights({"asimd", "asimddp"}, "aarch64")
    path = tmp_path / "vision.onnx"
    onnx.save(node_model(Q, SCALES, BIAS), str(path))
    assert vision_model_source(path, {"avx512f", "avx512_vnni"}) == str(path)
    if needs_unsigned_weights({"avx2"}):  # on x86-64: rewritten in memory, the file untouched
        assert isinstance(vision_model_source(path, {"avx2"}), bytes)
        assert onnx.load(str(path)).graph.initializer[0].data_type == TensorProto.INT8


def test_a_node_with_its_own_zero_point_is_left_alone(tmp_path):
    model = node_model(Q, SCALES, BIAS)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(N, np.int8), "w.zero"))
    model.graph.node[0].input[3] = "w.zero"
    onnx.save(model, str(tmp_path / "g.onnx"))
    assert unsigned_weight_model(tmp_path / "g.onnx")[1] == 0
