"""Point a decoder graph's eligible nodes at edgelmm's own kernels, without the onnx package.

The graph is re-encoded at the protobuf wire level (onnx.proto field numbers): every field is copied as it
is except, for each eligible node, its ``domain`` (``com.microsoft`` → ``edgelmm``), and the model gains an
opset import for ``edgelmm``. External-data initializers stay references. Eligible:
- ``MatMulNBits``: 4- or 8-bit, ``accuracy_level`` 4 (int8 compute: the numerics edgelmm's kernel reproduces), a
  block size dividing K (up to 4096, 8-bit 2048), no ``g_idx``;
- ``GroupQueryAttention``: no inputs past the rotary caches (position ids, attention bias, head sink), no
  softcap, sliding window, smooth softmax, interleaved rotary or qk output. By default it becomes
  ``GroupQueryAttentionHalfCache`` and its past/present graph inputs/outputs float16: half the cache's memory
  and the bytes each decode step reads; with an int8 cache ``GroupQueryAttentionInt8Cache``, past/present int8
  with rows of head_dim + 4 (each row's fp32 scale after its values; the last dimension becomes symbolic);
- ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``: always.
A ``FastGelu`` (no bias input) whose input is an eligible ``MatMulNBits``'s only use (Phi's fc1) is fused into
it: the matmul writes the FastGelu's output, with attribute ``gelu_tanh`` = 1, and the FastGelu node goes (one
pass over the activations and a buffer of them fewer). When the FastGelu's output in turn is only the input of
an eligible ``MatMulNBits`` (Phi's fc2), the three nodes become one ``GeluMlpNBits`` at the second matmul's place:
the intermediate activations, the prompt's largest buffer, then never exist whole in fp32. An eligible
``MatMulNBits`` whose output is only the packed query of an eligible ``GroupQueryAttention`` (the q|k|v
projection) becomes one ``QkvGroupQueryAttention`` (``...HalfCache``, ``...Int8Cache``) with it, at the attention's
place: a prompt's q|k|v rows are then made a few heads at a time.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

DOMAIN = "edgelmm"
_MODEL_OPSET_IMPORT, _MODEL_GRAPH = 8, 7
_GRAPH_NODE = 1
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 2, 3, 4, 5, 7
_GRAPH_VALUE_INFOS = (11, 12, 13)  # input, output, value_info
_VALUE_INFO_NAME, _VALUE_INFO_TYPE, _TYPE_TENSOR, _TENSOR_ELEM_TYPE = 1, 2, 1, 1
_INT8, _FLOAT16 = 3, 10
_TYPE_TENSOR_SHAPE, _SHAPE_DIM, _DIM_PARAM = 2, 1, 2
CACHE_OPS = {"float32": ("GroupQueryAttention", None), "float16": ("GroupQueryAttentionHalfCache", _FLOAT16),
             "int8": ("GroupQueryAttentionInt8Cache", _INT8)}  # cache dtype: attention op, cache element type
_ATTR_NAME, _ATTR_FLOAT, _ATTR_INT, _ATTR_TYPE, _ATTR_GRAPHS = 1, 2, 3, 20, (6, 11)
_ATTR_TYPE_INT = 2
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_NORM_INPUTS = {"SkipLayerNormalization": 5, "SkipSimplifiedLayerNormalization": 4}  # norm_op.c's inputs


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative varints are not written here")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, object, bytes]]:
    """(field number, wire type, value, the field's raw bytes) of each field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf")
        yield field, wire, value, buf[start:pos]


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _node_info(node: bytes) -> tuple[str, str, list[str], list[str], dict]:
    """(op_type, domain, inputs, outputs, int and float attributes) of a NodeProto."""
    op_type = domain = ""
    inputs, outputs, attrs = [], [], {}
    for field, _, value, _ in _fields(node):
        if field == _NODE_OP_TYPE:
            op_type = value.decode()
        elif field == _NODE_DOMAIN:
            domain = value.decode()
        elif field == _NODE_INPUT:
            inputs.append(value.decode())
        elif field == _NODE_OUTPUT:
            outputs.append(value.decode())
        elif field == _NODE_ATTRIBUTE:
            attr = {f: v for f, _, v, _ in _fields(value)}
            if any(f in attr for f in _ATTR_GRAPHS):
                attrs["<subgraph>"] = 1
            if _ATTR_INT in attr:
                attrs[attr[_ATTR_NAME].decode()] = _signed(attr[_ATTR_INT])
            elif _ATTR_FLOAT in attr:
                attrs[attr[_ATTR_NAME].decode()] = struct.unpack("<f", attr[_ATTR_FLOAT])[0]
    return op_type, domain, inputs, outputs, attrs


def _eligible(op_type: str, domain: str, inputs: list[str], attrs: dict) -> bool:
    if domain != "com.microsoft":
        return False
    if op_type == "MatMulNBits":
        k, n, block = attrs.get("K", 0), attrs.get("N", 0), attrs.get("block_size", 0)
        bits = attrs.get("bits")
        deepest = 4096 if bits == 4 else 2048  # a block fits one GEMM panel
        return (bits in (4, 8) and attrs.get("accuracy_level") == 4 and 16 <= block <= min(k, deepest)
                and block & (block - 1) == 0 and k % block == 0 and 0 < n and max(k, n) <= 1 << 24
                and not any(inputs[4:5]))  # as matmul_op.c's create() requires
    if op_type in _NORM_INPUTS:
        return len(inputs) <= _NORM_INPUTS[op_type]
    if op_type == "GroupQueryAttention":
        defaults = {"rotary_interleaved": 0, "softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0,
                    "qk_output": 0}
        return not any(inputs[9:]) and all(attrs.get(name, value) == value for name, value in defaults.items())
    return False


def _int_attribute(name: str, value: int) -> bytes:
    """An AttributeProto of type INT."""
    return (_len_field(_ATTR_NAME, name.encode()) + _encode_varint(_ATTR_INT << 3) + _encode_varint(value)
            + _encode_varint(_ATTR_TYPE << 3) + _encode_varint(_ATTR_TYPE_INT))


def _rewrite_node(node: bytes, op_type: str, output: str | None = None) -> bytes:
    """The node in domain ``edgelmm`` as ``op_type``; with ``output``, writing that (its only output) through a
    fused FastGelu (attribute gelu_tanh = 1)."""
    dropped = (_NODE_DOMAIN, _NODE_OP_TYPE) + ((_NODE_OUTPUT,) if output else ())
    kept = b"".join(raw for field, _, _, raw in _fields(node) if field not in dropped)
    if output:
        kept = (_len_field(_NODE_OUTPUT, output.encode()) + kept
                + _len_field(_NODE_ATTRIBUTE, _int_attribute("gelu_tanh", 1)))
    return kept + _len_field(_NODE_OP_TYPE, op_type.encode()) + _len_field(_NODE_DOMAIN, DOMAIN.encode())


def _fused_node(op_type: str, inputs: list[str], outputs: list[str], named_like: bytes, extra: dict[str, int]) -> bytes:
    """A node ``op_type`` in domain ``edgelmm`` with ``inputs`` and ``outputs``, the name and attributes of the
    node ``named_like``, and the int attributes ``extra``."""
    fields = [_len_field(_NODE_INPUT, name.encode()) for name in inputs]
    fields += [_len_field(_NODE_OUTPUT, name.encode()) for name in outputs]
    fields += [raw for field, _, _, raw in _fields(named_like) if field in (_NODE_NAME, _NODE_ATTRIBUTE)]
    fields += [_len_field(_NODE_ATTRIBUTE, _int_attribute(name, value)) for name, value in extra.items()]
    return b"".join(fields) + _len_field(_NODE_OP_TYPE, op_type.encode()) + _len_field(_NODE_DOMAIN, DOMAIN.encode())


def _padded(names: list[str], count: int) -> list[str]:
    return (names + [""] * count)[:count]


def _mlp_node(up: bytes, up_inputs: list[str], down: tuple) -> bytes:
    """The ``GeluMlpNBits`` node of an MLP: up's inputs (6, missing ones empty), then down's but A (5), down's
    output; up's name and attributes, and down's N, bits and block size."""
    _, _, down_inputs, down_outputs, down_attrs = down
    return _fused_node("GeluMlpNBits", _padded(up_inputs, 6) + _padded(down_inputs[1:], 5), down_outputs[:1], up,
                       {"down_" + name: down_attrs[name] for name in ("N", "bits", "block_size")})


def _qkv_attention_node(matmul: tuple, attention: bytes, attention_info: tuple, op_type: str) -> bytes:
    """The ``Qkv`` + ``op_type`` node of a q|k|v projection and its attention: the projection's inputs (6,
    missing ones empty), then the attention's from past_key on (6); the attention's outputs, name and
    attributes, and the projection's K, N, bits and block size."""
    _, _, matmul_inputs, _, matmul_attrs = matmul
    _, _, inputs, outputs, _ = attention_info
    return _fused_node("Qkv" + op_type, _padded(matmul_inputs, 6) + _padded(inputs[3:], 6), outputs, attention,
                       {name: matmul_attrs[name] for name in ("K", "N", "bits", "block_size")})


def _fusions(nodes: dict[int, tuple], graph_outputs: set[str]) -> tuple[dict[int, int], dict[int, tuple[int, int]],
                                                                          dict[int, int]]:
    """Positions of the nodes to fuse, ``nodes`` mapping the graph's fields' positions to their _node_info:
    ({an eligible MatMulNBits: the FastGelu fused into it}, {an MLP's second MatMulNBits: its first MatMulNBits
    and FastGelu}, {an attention: its q|k|v projection}). An MLP's first matmul is not in the first map."""
    if any("<subgraph>" in attrs for *_, attrs in nodes.values()):
        return {}, {}, {}  # a subgraph may read any tensor: leave the graph as it is
    uses: dict[str, int] = {}
    for _, _, inputs, _, _ in nodes.values():
        for name in inputs:
            uses[name] = uses.get(name, 0) + 1
    only_use = {name for name, count in uses.items() if count == 1 and name not in graph_outputs}
    matmuls = {i: node for i, node in nodes.items() if node[0] == "MatMulNBits" and len(node[3]) == 1
               and _eligible(node[0], node[1], node[2], node[4])}
    producer = {outputs[0]: i for i, (_, _, _, outputs, _) in matmuls.items()}
    reader = {inputs[0]: i for i, (_, _, inputs, _, _) in matmuls.items() if inputs[0] in only_use}
    gelus = {producer[inputs[0]]: j for j, (op, domain, inputs, _, _) in nodes.items()
             if op == "FastGelu" and domain == "com.microsoft" and not any(inputs[1:]) and inputs[0] in producer
             and inputs[0] in only_use}
    mlps, used = {}, set()  # a matmul joins one fusion at most (MLPs may chain: fc2 -> FastGelu -> ...)
    for up, gelu in sorted(gelus.items()):
        down = reader.get(nodes[gelu][3][0])
        if down is not None and not {up, down} & used and matmuls[down][4]["K"] == matmuls[up][4]["N"]:
            mlps[down] = (up, gelu)
            used |= {up, down}
    projections = {}  # a packed query made by a matmul read by nothing else
    for j, (op, domain, inputs, _, attrs) in nodes.items():
        source = producer.get(inputs[0]) if op == "GroupQueryAttention" and inputs else None
        heads = attrs.get("num_heads", 0) + 2 * attrs.get("kv_num_heads", 0)  # q|k|v heads of the packed query
        if (source is not None and source not in used and source not in gelus and inputs[0] in only_use
                and not any(inputs[1:3]) and _eligible(op, domain, inputs, attrs)
                and heads > 0 and matmuls[source][4]["N"] % heads == 0):
            projections[j] = source
    return {up: gelu for up, gelu in gelus.items() if up not in used}, mlps, projections


def _symbolic_last_dim(shape: bytes, name: str) -> bytes:
    """A TensorShapeProto with its last dimension replaced by the symbol ``name``."""
    dims = [(f, raw) for f, _, _, raw in _fields(shape)]
    if not any(f == _SHAPE_DIM for f, _ in dims):  # a scalar shape: nothing to change
        return shape
    last = max(i for i, (f, _) in enumerate(dims) if f == _SHAPE_DIM)
    dims[last] = (_SHAPE_DIM, _len_field(_SHAPE_DIM, _len_field(_DIM_PARAM, name.encode())))
    return b"".join(raw for _, raw in dims)


def _retyped(value_info: bytes, elem_type: int) -> bytes:
    """A ValueInfoProto of a tensor with its element type replaced (int8: and its last dimension symbolic, the
    cache's rows being longer than head_dim)."""
    out = []
    for field, wire, value, raw in _fields(value_info):
        if field == _VALUE_INFO_TYPE and wire == _LEN:
            type_proto = []
            for t_field, t_wire, t_value, t_raw in _fields(value):
                if t_field == _TYPE_TENSOR and t_wire == _LEN:
                    tensor = b"".join(_len_field(f, _symbolic_last_dim(v, "cache_row")) if f == _TYPE_TENSOR_SHAPE
                                      and elem_type == _INT8 else r
                                      for f, _, v, r in _fields(t_value) if f != _TENSOR_ELEM_TYPE)
                    t_raw = _len_field(_TYPE_TENSOR, _encode_varint(_TENSOR_ELEM_TYPE << 3) + _encode_varint(elem_type)
                                       + tensor)
                type_proto.append(t_raw)
            raw = _len_field(_VALUE_INFO_TYPE, b"".join(type_proto))
        out.append(raw)
    return b"".join(out)


def _value_name(value_info: bytes) -> str:
    return next((v.decode() for f, _, v, _ in _fields(value_info) if f == _VALUE_INFO_NAME), "")


def _rewrite_graph(graph_proto: bytes, attention_op: str, cache_type: int | None) -> tuple[bytes, int]:
    """A GraphProto with its eligible nodes moved (FastGelus, MLPs and q|k|v projections with their attention
    fused), and how many were moved."""
    graph = list(_fields(graph_proto))
    nodes = {i: _node_info(v) for i, (f, w, v, _) in enumerate(graph) if f == _GRAPH_NODE and w == _LEN}
    outputs = {_value_name(v) for f, w, v, _ in graph if f == _GRAPH_VALUE_INFOS[1] and w == _LEN}
    gelus, mlps, projections = _fusions(nodes, outputs)
    dropped = set(gelus.values()) | {p for pair in mlps.values() for p in pair} | set(projections.values())
    gone = {nodes[p][3][0] for p in dropped} | {nodes[m][3][0] for m in gelus}  # tensors the fusions remove
    moved, caches, kept = 0, set(), []
    for i, (field, wire, value, raw) in enumerate(graph):
        if i in dropped or (field == _GRAPH_VALUE_INFOS[2] and _value_name(value) in gone):
            continue
        op_type, domain, inputs, outs, attrs = nodes.get(i, ("", "", [], [], {}))
        if i in mlps:
            up = mlps[i][0]
            raw = _len_field(_GRAPH_NODE, _mlp_node(graph[up][2], nodes[up][2], nodes[i]))
            moved += 1
        elif _eligible(op_type, domain, inputs, attrs):
            if op_type == "GroupQueryAttention" and cache_type:
                op_type = attention_op
                caches.update(n for n in inputs[3:5] + outs[1:3] if n)
            if i in projections:
                node = _qkv_attention_node(nodes[projections[i]], value, nodes[i], op_type)
            else:
                node = _rewrite_node(value, op_type, nodes[gelus[i]][3][0] if i in gelus else None)
            raw = _len_field(_GRAPH_NODE, node)
            moved += 1
        kept.append((field, wire, value, raw))
    return b"".join(_len_field(f, _retyped(v, cache_type)) if f in _GRAPH_VALUE_INFOS and w == _LEN
                    and _value_name(v) in caches else r for f, w, v, r in kept), moved


def rewrite_model(model: bytes, cache: str = "float16") -> tuple[bytes, int]:
    """``model`` (a serialized ModelProto) with its eligible nodes in domain ``edgelmm``, and how many nodes
    were moved (a fused FastGelu not counted, a fused MLP or projection + attention counted once). The moved
    attention nodes keep their KV cache as ``cache`` (a ``CACHE_OPS`` key; the graph's past/present inputs and
    outputs are retyped to it)."""
    attention_op, cache_type = CACHE_OPS[cache]
    moved, out = 0, []
    for field, wire, value, raw in _fields(model):
        if field == _MODEL_GRAPH and wire == _LEN:
            graph, moved = _rewrite_graph(value, attention_op, cache_type)
            raw = _len_field(_MODEL_GRAPH, graph)
        out.append(raw)
    if moved:
        opset = _len_field(_OPSET_DOMAIN, DOMAIN.encode()) + _encode_varint(_OPSET_VERSION << 3) + _encode_varint(1)
        out.append(_len_field(_MODEL_OPSET_IMPORT, opset))
    return b"".join(out), moved
