"""Prompt templates per family (docs/model-formats.md: phi v0, llama/vicuna v1, Factory gemma/qwen2, Gemma chat,
llava-hf). ``render`` returns the exact text given to the tokenizer; ``<image>`` marks the image slot."""
from __future__ import annotations

from dataclasses import dataclass

from edgelmm.errors import ConfigError

IMAGE_TAG = "<image>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_V0 = SYSTEM + " USER: <image>\n{question} ASSISTANT:"


@dataclass(frozen=True, slots=True)
class Template:
    """A one-turn prompt format: ``text`` with ``{question}``, whether the tokenizer must prepend BOS,
    and the strings that end the answer."""

    name: str
    text: str
    add_bos: bool
    stop: tuple[str, ...]

    def render(self, question: str) -> tuple[str, tuple[int, int]]:
        """The prompt text and the span of ``question`` in it (the user's text, tokenized as plain text)."""
        if IMAGE_TAG in question:
            raise ConfigError(f"the prompt must not contain {IMAGE_TAG!r}: edgelmm places the image itself")
        head, tail = self.text.split("{question}")
        return head + question + tail, (len(head), len(head) + len(question))


TEMPLATES = {t.name: t for t in (
    Template("phi", _LLAVA_V0, add_bos=False, stop=("<|endoftext|>",)),
    Template("llama", _LLAVA_V0, add_bos=True, stop=("</s>",)),
    Template("vicuna_v1", _LLAVA_V0, add_bos=True, stop=("</s>",)),
    Template("gemma_factory", _LLAVA_V0, add_bos=True, stop=("<eos>",)),
    Template("qwen2", _LLAVA_V0, add_bos=False, stop=("<|im_end|>",)),
    Template("gemma_chat", "<bos><start_of_turn>user\n<image>\n{question}<end_of_turn>\n<start_of_turn>model\n",
             add_bos=False, stop=("<end_of_turn>", "<eos>")),
    Template("llava_hf", "USER: <image>\n{question}\nASSISTANT:", add_bos=True, stop=("</s>",)),
    # TinyGPT-V (MiniGPT-v2 eval conversation): <image> stands for <ImageHere>; Phi-2 adds no BOS
    Template("tinygpt-v", "###Human: <Img><image></Img> {question}###Assistant: ", add_bos=False, stop=("###",)),
)}
