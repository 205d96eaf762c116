"""The peers a benchmark compares edgelmm with, each a session for bench_run (``load``, ``run(new_tokens)``):

- ``transformers``: an HF Llava folder whole (LlavaForConditionalGeneration: its own image processor, vision
  tower and projector), else the language model alone (the bench's HF causal-LM folder); a StaticCache.
- ``llama.cpp`` (llama-cpp-python): the language model as GGUF Q4_0 / Q8_0 (edgelmm.bench.gguf).
- ``ort-genai`` (onnxruntime-genai): the language model built by onnxruntime-genai's own model builder (int4).

Language-model-only peers get the edgelmm prompt's length in token ids, image positions replaced by text."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgelmm.bench.weights import onnx_decode_bytes


def _llm_bytes(model, embed) -> int:
    """Decode-step weight bytes of an HF model's language part (embedding table: one row, unless tied)."""
    skip = ("vision_tower", "multi_modal_projector")
    params = {p.data_ptr(): p for n, p in model.named_parameters() if not any(s in n for s in skip)}
    total = sum(p.numel() * p.element_size() for p in params.values())
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    return total if tied else total - (embed.numel() - embed[0].numel()) * embed.element_size()


class TransformersPeer:
    """transformers on the same checkpoint (HF Llava: the whole VLM) or its language model, greedy decode over
    a StaticCache, one forward per token."""

    def __init__(self, job: dict):
        self.job = job
        self.vlm = job.get("hf_vlm", False)
        self.scope = "vlm" if self.vlm else "language-model-only"
        self.ids = job["vlm_prompt_ids"] if self.vlm else job["text_prompt_ids"]
        self.notes = []

    def load(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForCausalLM, LlavaForConditionalGeneration, StaticCache

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.job["dtype"] or "fp32", torch.float32)
        cls = LlavaForConditionalGeneration if self.vlm else AutoModelForCausalLM
        self.model = cls.from_pretrained(self.job["peer_model"], dtype=dtype).eval()
        self.processor = AutoImageProcessor.from_pretrained(self.job["peer_model"]) if self.vlm else None
        context = len(self.ids) + self.job["new_tokens"] + 16
        self.cache = StaticCache(config=self.model.config, max_cache_len=context)
        text = self.model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv_bytes_per_position = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * dtype.itemsize
        self.weight_bytes = _llm_bytes(self.model, self.model.get_input_embeddings().weight)
        self.weights, self.dtype = str(dtype)[6:], dtype

    def run(self, new_tokens: int) -> dict:
        import torch
        from PIL import Image

        with torch.inference_mode():
            self.cache.reset()
            ids = torch.tensor([self.ids])
            t0 = time.perf_counter()
            extra = {}
            if self.vlm:
                pixels = self.processor(images=Image.open(self.job["image"]).convert("RGB"), return_tensors="pt")
                t1 = time.perf_counter()
                feats = self.model.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.dtype),
                                                            return_dict=True)
                extra = {"mm_encoder_outputs": {"image": feats}}
            t1 = t1 if self.vlm else t0
            t2 = time.perf_counter()
            out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=torch.arange(ids.shape[1]),
                             logits_to_keep=1, use_cache=True, **extra)
            token = int(out.logits[0, -1].argmax())
            t3 = time.perf_counter()
            for position in range(ids.shape[1], ids.shape[1] + new_tokens - 1):
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=self.cache,
                                 cache_position=torch.tensor([position]), logits_to_keep=1, use_cache=True)
                token = int(out.logits[0, -1].argmax())
            t4 = time.perf_counter()
        return {"preprocess_s": t1 - t0 if self.vlm else None, "vision_s": t2 - t1 if self.vlm else None,
                "prefill_s": t3 - t2, "decode_s": t4 - t3, "decode_steps": new_tokens - 1}


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python on the language model's GGUF (Q4_0 / Q8_0), F16 KV cache."""

    scope = "language-model-only"

    def __init__(self, job: dict):
        self.job, self.ids, self.notes = job, job["text_prompt_ids"], []

    def load(self) -> None:
        import gguf
        from llama_cpp import Llama

        path = self.job["peer_model"]
        n_ctx = len(self.ids) + self.job["new_tokens"] + 16
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=self.job["threads"],
                         n_threads_batch=self.job["threads"], verbose=False)
        reader = gguf.GGUFReader(path)
        total, embed = 0, None
        for t in reader.tensors:
            total += int(t.n_bytes)
            if t.name == "token_embd.weight":
                embed = t
        tied = not any(t.name == "output.weight" for t in reader.tensors)
        if embed is not None and not tied:
            total -= int(embed.n_bytes) - int(embed.n_bytes) // int(embed.shape[-1])
        self.weight_bytes = total
        fields = {f.name: f for f in reader.fields.values()}
        arch = bytes(fields["general.architecture"].parts[-1]).decode()

        def field(key: str) -> int:
            f = fields[f"{arch}.{key}"]
            return int(f.parts[f.data[0]][0])

        layers, heads, kv_heads = field("block_count"), field("attention.head_count"), field("attention.head_count_kv")
        head_dim = field("attention.key_length") if f"{arch}.attention.key_length" in fields else \
            field("embedding_length") // heads
        self.kv_bytes_per_position = 2 * layers * kv_heads * head_dim * 2  # llama.cpp's default F16 cache
        self.weights = f"gguf {self.job['qtype']}"

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def run(self, new_tokens: int) -> dict:
        self.llm.reset()
        t2 = time.perf_counter()
        self.llm.eval(self.ids)
        token = int(np.argmax(self._logits()))
        t3 = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([token])
            token = int(np.argmax(self._logits()))
        t4 = time.perf_counter()
        return {"preprocess_s": None, "vision_s": None, "prefill_s": t3 - t2, "decode_s": t4 - t3,
                "decode_steps": new_tokens - 1}


class OrtGenaiPeer:
    """onnxruntime-genai's Generator on its own int4 build of the language model (shared past/present KV)."""

    scope = "language-model-only"

    def __init__(self, job: dict):
        self.job, self.ids, self.notes = job, job["text_prompt_ids"], []

    def load(self) -> None:
        import onnxruntime_genai as og

        folder = Path(self.job["peer_model"])
        config_path = folder / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        if options.get("intra_op_num_threads") != self.job["threads"]:
            options["intra_op_num_threads"] = self.job["threads"]
            config_path.write_text(json.dumps(config, indent=2))
        self.og, self.model = og, og.Model(str(folder))
        decoder = config["model"]["decoder"]
        self.weight_bytes = onnx_decode_bytes(folder / decoder["filename"])
        kv_elem = 2 if "16" in json.dumps(config["model"].get("io_dtype", "")) else 4
        inputs = [i for i in self._graph_inputs(folder / decoder["filename"]) if "past_key_values" in i[0]]
        if inputs:
            kv_elem = 2 if inputs[0][1] == 10 else 4  # onnx TensorProto.FLOAT16 = 10
        self.kv_bytes_per_position = (2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"]
                                      * decoder["head_size"] * kv_elem)
        self.weights = "onnx int4 (model builder)"

    @staticmethod
    def _graph_inputs(path: Path) -> list[tuple[str, int]]:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        return [(i.name, i.type.tensor_type.elem_type) for i in graph.input]

    def run(self, new_tokens: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(self.ids) + new_tokens + 16, do_sample=False)
        generator = og.Generator(self.model, params)
        t2 = time.perf_counter()
        generator.append_tokens(np.asarray([self.ids], np.int32))  # runs the prompt
        generator.generate_next_token()  # picks the first token from the prompt's logits
        t3 = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        generator.get_next_tokens()
        t4 = time.perf_counter()
        return {"preprocess_s": None, "vision_s": None, "prefill_s": t3 - t2, "decode_s": t4 - t3,
                "decode_steps": new_tokens - 1}


PEERS = {"transformers": TransformersPeer, "llama.cpp": LlamaCppPeer, "ort-genai": OrtGenaiPeer}
