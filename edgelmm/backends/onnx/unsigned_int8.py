"""Int8 vision graphs on x86 CPUs without VNNI: their ``DynamicQuantizeMatMul`` weights made unsigned.

onnxruntime multiplies uint8 activations by int8 weights with ``vpmaddubsw`` on such CPUs, which sums pairs of
products into saturating int16 lanes, so large activations next to large weights are clipped. The same product
with uint8 weights (``q + 128``, zero point 128 per output channel) takes its u8u8 kernel, which widens to int16
before multiplying and never saturates: the result equals the int8 graph's exact arithmetic. The choice is made
once, when the vision session opens, from the CPU's flags; the graph is rewritten in memory (with ``onnx``),
never on disk."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def needs_unsigned_weights(cpu_flags: set[str], machine: str | None = None) -> bool:
    """Whether onnxruntime's int8 x int8 GEMM saturates here: an x86-64 CPU with neither VNNI flag."""
    return (machine or platform.machine()) in ("x86_64", "AMD64") and not cpu_flags & set(VNNI_FLAGS)


def unsigned_weight_model(path: Path):
    """The ONNX model at ``path`` (external data loaded) with every ``DynamicQuantizeMatMul`` that has int8
    weights and no zero point rewritten to uint8 weights ``q + 128`` and a uint8 zero point of 128 per output
    column; returns (model, rewritten node count). Raises ImportError when the ``onnx`` package is missing."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "DynamicQuantizeMatMul" or len(node.input) > 3 and node.input[3]:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.INT8:
            continue
        q = numpy_helper.to_array(weight)  # [K, N] int8
        weight.CopyFrom(numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), weight.name))
        zero_name = f"{weight.name}.zero_point_128"
        graph.initializer.append(numpy_helper.from_array(np.full(q.shape[-1], 128, np.uint8), zero_name))
        inputs = list(node.input) + [""] * (4 - len(node.input))
        inputs[3] = zero_name
        del node.input[:]
        node.input.extend(inputs)
        rewritten += 1
    return model, rewritten


def vision_model_source(path: Path, cpu_flags: set[str]) -> str | bytes:
    """What the vision session opens: the graph's path, or on a CPU that needs it (``needs_unsigned_weights``)
    the serialized graph with unsigned weights. Without the ``onnx`` package the graph opens as it is, with a
    note on stderr that its int8 products may saturate."""
    if not needs_unsigned_weights(cpu_flags):
        return str(path)
    try:
        model, rewritten = unsigned_weight_model(path)
    except ImportError:
        print("edgelmm: this CPU has no VNNI, so onnxruntime's int8 vision kernels can saturate; install onnx "
              "(pip install onnx) to let edgelmm run them with unsigned weights", file=sys.stderr)
        return str(path)
    return model.SerializeToString() if rewritten else str(path)
