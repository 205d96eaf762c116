"""A small onnx.helper graph builder for hand-written graphs: named initializers, nodes that return their
output names, linears as com.microsoft ``MatMulNBits`` (group-quantized), ``DynamicQuantizeMatMul`` (int8
per-channel weights, activations quantized to uint8 per tensor at run time) or ``MatMul`` (+ ``Add``), and
saving with the weights as external data beyond a few MB."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgelmm.backends.onnx.config import external_data_path
from edgelmm.errors import UnsupportedModelError

OPSET = 21  # ONNX domain opset; onnxruntime 1.31 runs up to 23
IR_VERSION = 10  # what onnxruntime >= 1.20 accepts
MS_DOMAIN = "com.microsoft"
# Bytes of initializers above which tensors go to a .data file. Not only protobuf's 2 GB limit: onnxruntime
# keeps in-protobuf initializers beside its prepacked MatMulNBits copies, while external data it can drop.
EXTERNAL_DATA_LIMIT = 64_000_000
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


@dataclass
class NBits:
    """A weight in ``MatMulNBits`` layout (docs/quant-formats.md §3.1): ``b`` uint8 ``[N, k_blocks, blob]``,
    ``scales`` float32 ``[N, k_blocks]``, ``zeros`` uint8 ``[N, k_blocks]`` (unpacked) or None for the
    default ``2^(bits-1)``."""

    b: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bits: int
    block_size: int


@dataclass
class ChannelInt8:
    """A weight as symmetric int8 per output channel: ``q`` int8 ``[K, N]`` and ``scales`` float32 ``[N]``,
    ``W^T = q * scales``."""

    q: np.ndarray
    scales: np.ndarray


@dataclass
class Linear:
    """``y = x @ W^T + bias`` for ``W [N, K]``: fp ``weight_t [K, N]``, group-quantized ``nbits`` or
    per-channel ``int8``."""

    k: int
    n: int
    weight_t: np.ndarray | None = None
    nbits: NBits | None = None
    bias: np.ndarray | None = None
    int8: ChannelInt8 | None = None


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Unpacked zeros uint8 ``[N, k_blocks]`` → MatMulNBits' packed ``[N, ceil(k_blocks * bits / 8)]``
    (two 4-bit zeros per byte, the even block in the low nibble)."""
    if bits == 8:
        return zeros.astype(np.uint8)
    z = zeros.astype(np.uint8)
    if z.shape[1] % 2:
        z = np.pad(z, ((0, 0), (0, 1)))
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)


class GraphBuilder:
    """Accumulates nodes, initializers and graph I/O; ``dtype`` is the float type of activations."""

    def __init__(self, name: str, dtype: str = "float32", accuracy_level: int = 0):
        self.name, self.accuracy_level = name, accuracy_level
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer (used as is: cast float arrays with :meth:`fp` first)."""
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def fp(self, name: str, array: np.ndarray) -> str:
        """Add a float initializer in the activation dtype."""
        return self.init(name, np.asarray(array, dtype=np.float32).astype(self.np_dtype))

    def const(self, values, dtype=np.int64) -> str:
        """A (deduplicated) constant initializer, e.g. axes or shapes."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str | None = None, name: str | None = None,
             outputs: list[str] | None = None, **attrs) -> list[str]:
        """Add a node; returns its output names (fresh unless ``outputs`` is given; "" = unused)."""
        self._count += 1
        base = name or f"{op}_{self._count}"
        outputs = outputs or [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=base, domain=domain, **attrs))
        return outputs

    def op(self, op: str, *inputs: str, domain: str | None = None, **attrs) -> str:
        """Add a single-output node and return its output name."""
        return self.node(op, list(inputs), domain=domain, **attrs)[0]

    def linear(self, x: str, lin: Linear, name: str) -> str:
        """``x [..., K] → [..., N]`` through ``lin``."""
        bias = self.fp(f"{name}.bias", lin.bias) if lin.bias is not None else ""
        if lin.int8 is not None:  # bias fused; the op quantizes x per tensor (uint8) and runs an int8 GEMM
            inputs = [x, self.init(f"{name}.qweight", lin.int8.q), self.init(f"{name}.scales", lin.int8.scales)]
            return self.node("DynamicQuantizeMatMul", inputs + (["", bias] if bias else []), domain=MS_DOMAIN,
                             name=f"{name}/DynamicQuantizeMatMul")[0]
        if lin.nbits is None:
            y = self.op("MatMul", x, self.fp(f"{name}.weight", lin.weight_t), name=f"{name}/MatMul")
            return self.op("Add", y, bias, name=f"{name}/Add") if bias else y
        q = lin.nbits
        zeros = self.init(f"{name}.zero_points", pack_zero_points(q.zeros, q.bits)) if q.zeros is not None else ""
        inputs = [x, self.init(f"{name}.qweight", q.b), self.fp(f"{name}.scales", q.scales), zeros, "", bias]
        while inputs[-1] == "":
            inputs.pop()
        return self.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=f"{name}/MatMulNBits", K=lin.k, N=lin.n,
                         bits=q.bits, block_size=q.block_size, accuracy_level=self.accuracy_level)[0]

    def activation(self, x: str, act: str) -> str:
        """The HF activation ``act`` as a (contrib) op."""
        if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            return self.op("FastGelu", x, domain=MS_DOMAIN)
        if act in ("gelu", "quick_gelu", "silu"):
            alpha = {"quick_gelu": 1.702, "silu": 1.0}.get(act)
            return self.op("QuickGelu", x, domain=MS_DOMAIN, alpha=alpha) if alpha else self.op("Gelu", x, domain=MS_DOMAIN)
        raise UnsupportedModelError(f"activation {act!r} has no ONNX mapping")

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="edgelmm")


def save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save ``model`` to ``path``; weights go to ``<path>.data`` beyond ``EXTERNAL_DATA_LIMIT``.
    Returns the files written."""
    path = Path(path)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size < EXTERNAL_DATA_LIMIT:
        onnx.save_model(model, str(path))
        return [path]
    data = external_data_path(path)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if not data.exists():  # every tensor was under the threshold
        return [path]
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it 0600; readable like the graph, as umask says
    return [path, data]
