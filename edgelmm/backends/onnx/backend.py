"""The onnxruntime backend: runs an ``edgelmm export --format onnx`` folder (vision, embedding and decoder
graphs, tied together by genai_config.json) with onnxruntime and numpy only — nothing on this path imports
torch.

The KV cache is one preallocated OrtValue per layer and per K/V, of the whole context's length, bound both
as the decoder's ``past_key_values.i.*`` input and as its ``present.i.*`` output, so GroupQueryAttention
appends to it in place (past/present buffer sharing) and no step copies the cache. Logits go to a
preallocated output; on CUDA the embeddings stay on the device between the embedding and decoder runs
(a prompt longer than ``EDGELMM_PREFILL_CHUNK`` is embedded and run chunk by chunk).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgelmm.backends.onnx import ops as ort_ops
from edgelmm.backends.onnx.config import (
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    OnnxConfig,
    chunk_bounds,
    external_data_path,
    prefill_chunk,
)
from edgelmm.backends.onnx.unsigned_int8 import vision_model_source
from edgelmm.checkpoint.finite import require_finite
from edgelmm.errors import CheckpointError, ConfigError, EdgeLMMError
from edgelmm.spec import check_image_positions

_NP = {"float32": np.float32, "float16": np.float16}
_CACHE_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("this is an ONNX export; install onnxruntime (pip install edgelmm[onnx]) "
                          "or onnxruntime-gpu") from None
    return onnxruntime


def providers(target: str, device: str | None) -> list[str]:
    """Execution providers by availability: TensorRT / CUDA for a CUDA (fp16) export unless ``device`` is
    "cpu", else CPU. CPU exports run on CPU (GroupQueryAttention has no fp32 CUDA kernel)."""
    available = _ort().get_available_providers()
    chosen = []
    if target == "cuda" and device != "cpu":
        chosen = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    elif device not in (None, "cpu"):
        raise ConfigError(f"this ONNX export targets the CPU; device {device!r} needs an export with --target cuda")
    return chosen + ["CPUExecutionProvider"]


@lru_cache(maxsize=1)
def _shared_cpu_arena() -> bool:
    """Registers, once per process, the CPU arena all of edgelmm's sessions share (onnxruntime's environment
    allocator), growing by exactly what a run asks for: one arena instead of one per graph, and no doubling
    growth, so the graphs reuse each other's freed memory and the peak stays lower. False when onnxruntime
    refuses (e.g. the application registered its own; then that one is shared)."""
    ort = _ort()
    same_as_requested = 1  # OrtArenaCfg's arena_extend_strategy: 0 next power of two, 1 same as requested
    try:
        ort.create_and_register_allocator(
            ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
            ort.OrtArenaCfg(0, same_as_requested, -1, -1))
    except Exception:  # noqa: BLE001 - an allocator already registered is shared as it is
        return False
    return True


def session_options(providers: list[str], threads: int | None = None, profile_prefix: str | None = None):
    """SessionOptions for a session on ``providers``: ``threads`` intra-op threads (default ``EDGELMM_THREADS``
    or onnxruntime's choice), full graph optimization, the shared CPU arena, optional profiling to
    ``profile_prefix``. On CPU alone no memory pattern: from its second run with the same shapes onnxruntime
    would put all of a graph's activations in one new block beside the arena chunks the first run left, raising
    the peak resident set of every repeated prompt."""
    ort = _ort()
    _shared_cpu_arena()
    opts = ort.SessionOptions()
    opts.enable_mem_pattern = providers != ["CPUExecutionProvider"]
    opts.add_session_config_entry("session.use_env_allocators", "1")
    threads = threads or int(os.environ.get("EDGELMM_THREADS", "0"))
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def decoder_session(path: Path, providers: list[str], threads: int | None = None,
                    profile_prefix: str | None = None, edgelmm_ops: bool = False):
    """(the decoder's InferenceSession, whether edgelmm's kernels run in it). With ``edgelmm_ops`` (an fp32 CPU
    export where edgelmm.backends.onnx.ops applies) its 4/8-bit int8-compute MatMulNBits and GroupQueryAttention nodes
    run on edgelmm's kernels instead of onnxruntime's, the KV cache as ``EDGELMM_ONNX_KV`` says (fp16 by
    default; ``ort_ops.kv_cache``); any failure to set that up falls back to onnxruntime's kernels with a note
    on stderr."""
    ort = _ort()

    if edgelmm_ops and providers == ["CPUExecutionProvider"]:
        opts, cache = session_options(providers, threads, profile_prefix), ort_ops.kv_cache()
        try:
            model, moved = ort_ops.rewrite_model(Path(path).read_bytes(), cache)
            if moved:
                opts.register_custom_ops_library(str(ort_ops.library()))
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(Path(path).parent))
                return ort.InferenceSession(model, opts, providers=providers), True
        except Exception as e:  # noqa: BLE001 - any failure of the ops falls back to onnxruntime's kernels
            print(f"edgelmm: edgelmm's CPU ops did not load, using onnxruntime's kernels ({e})", file=sys.stderr)
    return ort.InferenceSession(str(path), session_options(providers, threads, profile_prefix),
                                providers=providers), False


@contextmanager
def damaged_graph(path: Path) -> Iterator[None]:
    """Turn a failure to open the graph ``path`` (truncated or corrupt ``.onnx`` or ``.onnx.data``: onnxruntime's
    InvalidProtobuf, onnx's DecodeError, a missing data file) into a CheckpointError naming it."""
    try:
        yield
    except (EdgeLMMError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's and onnx's errors share no base class but Exception
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} (or its .data file) is truncated or corrupt ({reason}); "
                              "export the model again") from None


class KVDecoder:
    """A decoder session with its preallocated KV buffers (one OrtValue per layer and K/V, bound as both
    past and present) and logits output, bound once; ``run`` binds only the step's embeddings and mask.
    ``prefill`` runs a prompt longer than ``chunk`` tokens (0: no limit) in equal chunks
    (``onnx_config.prefill_chunk``)."""

    def __init__(self, session, text, dtype, max_seq_len: int, device_type: str = "cpu", chunk: int = 0):
        ort = _ort()
        self.session, self.max_seq_len, self.device_type, self.chunk = session, max_seq_len, device_type, chunk
        types = {i.name: i.type for i in session.get_inputs()}  # fp16 or int8 caches on edgelmm's attention op

        def cache(name):  # in the dtype the graph declares (the export's own when it declares none)
            cache_dtype = _CACHE_TYPES.get(types.get(name), np.dtype(dtype).name)
            shape = [1, text.num_kv_heads, max_seq_len, ort_ops.cache_row_elements(text.head_dim, cache_dtype)]
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(cache_dtype), device_type, 0)

        self.kv = [(cache(PAST_KEY % i), cache(PAST_VALUE % i)) for i in range(text.num_layers)]
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, text.vocab_size], dtype, "cpu", 0)
        self.mask = np.ones((1, max_seq_len), np.int64)
        self.binding = session.io_binding()
        for i, (k, v) in enumerate(self.kv):
            self.binding.bind_ortvalue_input(PAST_KEY % i, k)
            self.binding.bind_ortvalue_input(PAST_VALUE % i, v)
            self.binding.bind_ortvalue_output(PRESENT_KEY % i, k)
            self.binding.bind_ortvalue_output(PRESENT_VALUE % i, v)
        self.binding.bind_ortvalue_output("logits", self.logits)

    def run(self, embeds, total: int) -> np.ndarray:
        """Run ``embeds`` (an OrtValue or numpy array [1, S, D]) as positions total-S..total-1; the cache must
        hold positions 0..total-S-1. Returns the last position's logits [V] as float32."""
        if total > self.max_seq_len:
            raise ConfigError(f"position {total - 1} is past the {self.max_seq_len}-token KV cache")
        if isinstance(embeds, np.ndarray):
            self.binding.bind_cpu_input("inputs_embeds", embeds)
        else:
            self.binding.bind_ortvalue_input("inputs_embeds", embeds)
        self.binding.bind_cpu_input("attention_mask", self.mask[:, :total])
        self.session.run_with_iobinding(self.binding)
        return self.logits.numpy()[0, -1].astype(np.float32)  # a copy: the buffer is rewritten next step

    def prefill(self, seq: int, embed) -> np.ndarray:
        """Run a ``seq``-token prompt from position 0, chunk by chunk: ``embed(start, end)`` gives positions
        start..end-1's embeddings (so no whole-prompt embeddings need exist). The last position's logits [V]."""
        for start, end in chunk_bounds(seq, self.chunk):
            logits = self.run(embed(start, end), end)
        return logits


class MappedPages:
    """This process's mappings of a file onnxruntime mapped its external weights from, whose pages ``release``
    drops from the resident set (madvise MADV_DONTNEED; the page cache keeps them, so reading them again costs
    a minor fault). For the embedding table: a lookup reads a few rows, but the kernel's fault-around maps up
    to 64 KB of cached file around each, and they would stay resident. onnxruntime maps the file private and
    never writes it, so no page is lost; a lookup pays the minor faults of its rows again, in exchange for a
    resident set that stays bounded over a long answer. Linux only; elsewhere ``release`` does nothing."""

    def __init__(self, path: Path):
        self.ranges, self._madvise = [], None
        try:
            import ctypes

            with open("/proc/self/maps") as f:
                self.ranges = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in f
                               if line.rstrip().endswith(str(path.resolve())) and line.split()[1][3] == "p"]
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
            self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError, ValueError, IndexError):
            self.ranges = []

    def release(self) -> None:
        for start, end in self.ranges:
            self._madvise(start, end - start, 4)  # MADV_DONTNEED


class OnnxBackend:
    """Three onnxruntime sessions and the KV decoder; implements generate.Backend."""

    def __init__(self, config: OnnxConfig, sessions: dict, device_type: str, max_seq_len: int,
                 decoder_kernels: str = "onnxruntime"):
        self.config, self.spec = config, config.spec
        self.decoder_kernels = decoder_kernels  # "edgelmm" when edgelmm.backends.onnx.ops runs the decoder's hot ops
        self.vision, self.embedding = sessions["vision"], sessions["embedding"]
        self.embedding_pages = MappedPages(external_data_path(config.embedding))
        self.device_type, self.max_seq_len = device_type, max_seq_len
        t = self.spec.text
        self.dtype = _NP[config.io_dtype]
        self.decoder = KVDecoder(sessions["decoder"], t, self.dtype, max_seq_len, device_type, prefill_chunk())
        self.no_image = np.zeros((1, 1, t.hidden_size), self.dtype)  # image_features for text-only steps
        self.image_ids = np.array(config.image_token_ids, np.int64)

    @classmethod
    def load(cls, folder: Path, device: str | None = None, context_length: int | None = None,
             threads: int | None = None, vision: bool = True) -> OnnxBackend:
        """Open the export in ``folder``; ``context_length`` caps the preallocated KV cache. ``vision=False``
        leaves the vision graph unopened (text-only prompts, e.g. to measure the language model alone)."""
        ort = _ort()
        config = OnnxConfig.read(folder)
        chosen = providers(config.target, device)
        no_trt = [p for p in chosen if p != "TensorrtExecutionProvider"]
        with damaged_graph(config.decoder):
            decoder, edgelmm_ops = decoder_session(config.decoder, no_trt, threads,
                                                   edgelmm_ops=ort_ops.applies(config.target, config.io_dtype))
        on_cpu = chosen == ["CPUExecutionProvider"]
        vision_session = None
        if vision:
            with damaged_graph(config.vision):
                source = vision_model_source(config.vision, ort_ops.cpu_flags()) if on_cpu else str(config.vision)
                vision_session = ort.InferenceSession(source, session_options(chosen, threads), providers=chosen)
        with damaged_graph(config.embedding):
            embedding = ort.InferenceSession(str(config.embedding), session_options(no_trt, threads),
                                             providers=no_trt)
        sessions = {"vision": vision_session, "embedding": embedding, "decoder": decoder}
        device_type = "cuda" if "CUDAExecutionProvider" in sessions["decoder"].get_providers() else "cpu"
        limit = min(context_length or config.context_length, config.context_length)
        return cls(config, sessions, device_type, limit, "edgelmm" if edgelmm_ops else "onnxruntime")

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """pixels [1, 3, S, S] → image features [1, N, D] (numpy, the export's I/O dtype)."""
        if self.vision is None:
            raise ConfigError("this export was loaded without its vision graph (vision=False)")
        return self.vision.run(["image_features"], {"pixel_values": pixels.astype(self.dtype)})[0]

    def _embed(self, ids: list[int], features: np.ndarray):
        binding = self.embedding.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
        binding.bind_cpu_input("image_features", np.ascontiguousarray(features, self.dtype))
        binding.bind_output("inputs_embeds", self.device_type)
        self.embedding.run_with_iobinding(binding)
        self.embedding_pages.release()  # the rows are copied out
        return binding.get_outputs()[0]

    def prefill(self, ids: list[int], features: np.ndarray | None) -> np.ndarray:
        """Run the prompt from position 0 (image positions take ``features`` in order; None: a text-only
        prompt); logits [V]. Embedded chunk by chunk with the decoder's chunks."""
        if not ids:
            raise ConfigError("the prompt is empty")
        images_before = np.concatenate([[0], np.cumsum(np.isin(np.asarray(ids), self.image_ids))])  # [len + 1]
        images, per_image = (0, 0) if features is None else features.shape[:2]
        check_image_positions(int(images_before[-1]), images, per_image)
        given = images * per_image
        if features is not None:  # [B, N, D]: spliced flattened, in order
            features = features.reshape(1, given, features.shape[-1])

        def embed(start, end):
            first, last = images_before[start], images_before[end]  # the chunk's image features
            return self._embed(ids[start:end], features[:, first:last] if last > first else self.no_image)

        return require_finite(self.decoder.prefill(len(ids), embed), "prefill")

    def decode(self, token: int, position: int) -> np.ndarray:
        """Feed ``token`` at ``position`` (the cache holds positions 0..position-1); logits [V]."""
        return require_finite(self.decoder.run(self._embed([token], self.no_image), position + 1),
                              f"decode at position {position}")
