"""EdgeLMM: the public facade. ``EdgeLMM.load(path).ask(image, prompt)``. Backend-independent and
torch-free: the backend (PyTorch, or onnxruntime for an ONNX export) is imported when a model loads."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgelmm.backends.onnx.config import is_onnx_export
from edgelmm.checkpoint.manifest import verify_manifest
from edgelmm.errors import CheckpointError, ConfigError, ModelBusyError, PromptTooLongError
from edgelmm.families.tinygptv import is_description
from edgelmm.generate import Backend, StopStringFilter, generate_ids
from edgelmm.processing.image import load_image, preprocess
from edgelmm.processing.templates import IMAGE_TAG, TEMPLATES, Template
from edgelmm.processing.tokenizer import Tokenizer
from edgelmm.sampling import SamplingParams
from edgelmm.spec import IMAGE_PLACEHOLDER


@dataclass
class Generation:
    """One answer: ``text``, the generated ``token_ids``, the exact rendered ``prompt`` fed to the
    tokenizer, and ``timings`` in seconds (preprocess, vision, prefill, decode)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class EdgeLMM:
    """A loaded vision-language model: backend, tokenizer, image preprocessing and prompt template.

    Safe to call from several threads: image preprocessing and tokenizing run in parallel, the backend
    (its KV cache and buffers) serves one answer at a time, in the order the callers reach it. A
    ``stream()`` holds the backend until it is exhausted or closed."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, path: Path):
        self.backend, self.tokenizer, self.path = backend, tokenizer, path
        self.spec = backend.spec
        self.template: Template = TEMPLATES[self.spec.template]
        self.stop_ids = {i for i in (tokenizer.token_to_id(s) for s in self.template.stop) if i is not None}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self._backend_lock = threading.Lock()
        self._backend_holder: int | None = None  # the thread whose answer is using the backend

    @contextmanager
    def _backend_turn(self) -> Iterator[None]:
        """Wait for the backend, then hold it for one answer. The thread already holding it (an unfinished
        stream) is refused, since waiting on itself would never end."""
        me = threading.get_ident()
        if self._backend_holder == me:
            raise ModelBusyError("this thread has not finished reading an earlier stream() of this model; "
                                 "exhaust it or call its close() before asking again")
        with self._backend_lock:
            self._backend_holder = me
            try:
                yield
            finally:
                self._backend_holder = None

    @classmethod
    def load(cls, path, device=None, dtype=None, vision_tower=None, context_length: int | None = None,
             max_memory=None, quantize: str | None = None, quantize_vision: bool = False) -> EdgeLMM:
        """Load an unmodified checkpoint folder (TinyLLaVA Factory/legacy, HF Llava, Mipha), or a TinyGPT-V
        description ``.json`` naming its released pieces (see ``edgelmm.backends.torch.tinygptv``), offline.

        An ``edgelmm export --format onnx`` folder runs on onnxruntime (``dtype`` and ``vision_tower`` unused).
        ``device`` defaults to CUDA when available, else CPU; ``dtype`` to fp16 on CUDA and fp32 on CPU.
        ``vision_tower`` points legacy TinyLLaVA at its separate SigLIP folder when it is not found beside
        the checkpoint. ``context_length`` caps the preallocated KV cache (default: the model's context).
        ``max_memory`` (e.g. ``"8GB"``) makes loading refuse up front, with the memory plan in the
        MemoryBudgetError, a model that cannot fit instead of running out of memory mid-answer.
        ``quantize`` (``"nf4"``, ``"fp4"`` or ``"int8"``) quantizes the language model's linears with bitsandbytes
        as they load (``quantize_vision``: the vision tower's too); it needs ``pip install edgelmm[bnb]``."""
        folder = Path(path).expanduser()
        if is_description(folder):  # a description file naming released pieces (TinyGPT-V)
            from edgelmm.backends.torch.tinygptv import load_tinygptv

            return cls(*load_tinygptv(folder, device, dtype, context_length, max_memory, quantize, quantize_vision))
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder; pass the path of a checkpoint folder")
        verify_manifest(folder)  # an edgelmm export: every file's sha256 (ChecksumError names a damaged one)
        if is_onnx_export(folder):  # an ONNX export runs on onnxruntime, without torch
            from edgelmm.backends.onnx.backend import OnnxBackend
            from edgelmm.plan.memory import parse_size, require_fit
            from edgelmm.plan.sources import plan_onnx_export

            if quantize is not None:
                raise ConfigError(f"{folder} is an ONNX export, quantized when exported; load it without quantize=")
            if max_memory is not None:
                require_fit(plan_onnx_export(folder, context_length, parse_size(max_memory)),
                            "Use a 4-bit export, --vision-bits 8, or a shorter context_length.")

            return cls(OnnxBackend.load(folder, device, context_length), Tokenizer.from_dir(folder), folder)
        from edgelmm.backends.torch.backend import TorchBackend

        backend = TorchBackend.load(folder, device, dtype, vision_tower, context_length, max_memory, quantize,
                                    quantize_vision)
        return cls(backend, Tokenizer.from_dir(folder), folder)

    def prompt_ids(self, prompt: str) -> tuple[str, list[int]]:
        """Render the template and tokenize it, with the image slot expanded to one id per image token."""
        text, (start, end) = self.template.render(prompt)
        n = self.spec.vision.num_image_tokens
        if self.spec.image_token_id is None:  # LLaVA codebase: tokenize around <image>, splice a sentinel
            before, after = text.split(IMAGE_TAG)
            offset = len(before) + len(IMAGE_TAG)  # the template puts the image before the question
            return text, (self.tokenizer.encode(before, add_bos=self.template.add_bos) + [IMAGE_PLACEHOLDER] * n
                          + self.tokenizer.encode_prompt(after, (start - offset, end - offset), add_bos=False))
        # HF Llava: <image> is a real token
        ids = self.tokenizer.encode_prompt(text, (start, end), add_bos=self.template.add_bos)
        out: list[int] = []
        for i in ids:
            out.extend([i] * n if i == self.spec.image_token_id else [i])
        return text, out

    def pixels(self, image):
        """The preprocessed image [1, 3, S, S] float32 (numpy) for any accepted image input."""
        return preprocess(load_image(image), self.spec.image)[None]

    def _run(self, image, prompt: str, params: SamplingParams, result: Generation) -> Iterator[str]:
        check_prompt(prompt)
        timings = result.timings
        t0 = time.perf_counter()
        pixels = self.pixels(image)
        result.prompt, ids = self.prompt_ids(prompt)
        if len(ids) >= self.backend.max_seq_len:
            raise PromptTooLongError(f"the prompt is {len(ids)} tokens (with {self.spec.vision.num_image_tokens} "
                                     f"image tokens) but the context holds {self.backend.max_seq_len}; shorten it")
        timings["preprocess"] = time.perf_counter() - t0
        with self._backend_turn():  # the time spent waiting for another thread's answer is in no timing
            t1 = time.perf_counter()
            features = self.backend.encode_image(pixels)
            t2 = time.perf_counter()
            timings["vision"] = t2 - t1
            text_filter = StopStringFilter(self.template.stop + params.stop)
            decoder, decoded = self.tokenizer.decode_stream(), ""
            tokens = generate_ids(self.backend, ids, features, params, self.stop_ids | set(params.stop_token_ids))
            t3 = time.perf_counter()
            for token in tokens:
                if not result.token_ids:
                    t3 = time.perf_counter()
                    timings["prefill"] = t3 - t2
                result.token_ids.append(token)
                decoded += decoder.push(token)
                piece = text_filter.push(decoded)
                if piece:
                    result.text += piece
                    yield piece
                if text_filter.stopped:
                    break
            timings.setdefault("prefill", time.perf_counter() - t2)
            timings["decode"] = time.perf_counter() - t3
            tail = text_filter.finish(decoded + decoder.flush())
            if tail:
                result.text += tail
                yield tail

    def generate(self, image, prompt: str, **sampling) -> Generation:
        """Answer ``prompt`` about ``image`` (a path, PIL image, bytes or numpy array); ``sampling`` takes
        the SamplingParams fields (max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids)."""
        result = Generation()
        for _ in self._run(image, prompt, SamplingParams(**sampling), result):
            pass
        return result

    def stream(self, image, prompt: str, *, result: Generation | None = None, **sampling) -> Iterator[str]:
        """Like ``generate``, yielding the answer's text pieces as they are decoded. Pass an empty
        ``Generation`` as ``result`` to receive the token ids, prompt and timings as well."""
        yield from self._run(image, prompt, SamplingParams(**sampling), result if result is not None else Generation())

    def ask(self, image, prompt: str, **sampling) -> str:
        """The answer's text."""
        return self.generate(image, prompt, **sampling).text


def check_prompt(prompt) -> None:
    """Refuse a prompt that is not a str of valid Unicode (e.g. undecodable command-line bytes)."""
    if not isinstance(prompt, str):
        raise ConfigError(f"the prompt must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"the prompt is not valid UTF-8 text (character {exc.start}: "
                          f"{prompt[exc.start:exc.end]!r}); pass the question as UTF-8") from None
