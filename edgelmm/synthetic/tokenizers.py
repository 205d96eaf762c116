"""Tiny tokenizers in the real on-disk formats of the supported LLM families, for ``edgelmm make-tiny``.

Each style is trained with the ``tokenizers`` BPE trainer on a small built-in English corpus, so common
words are single tokens, and is written with the files and fields the real checkpoints ship:

- ``"phi2"``: GPT-2 byte-level BPE like ``microsoft/phi-2`` (CodeGenTokenizer): ``<|endoftext|>`` is
  the last id of ``vocab.json`` and serves as bos = eos = unk = pad; whitespace-run added tokens follow it.
- ``"llama"``: TinyLlama (sentencepiece converted to tokenizer.json): BPE with byte fallback, ``▁``
  metaspace pre-tokenizer, ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then ``<0x00>``..``<0xFF>``;
  optionally ``<image>`` and ``<pad>`` appended, as in ``bczhou/tiny-llava-v1-hf`` (32000, 32001).
- ``"gemma"``: Gemma: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, ``<unk>`` = 3, ``<mask>`` = 4,
  ``<start_of_turn>`` = 5, ``<end_of_turn>`` = 6 (106/107 in the real vocabulary), bytes, spaces
  normalized to ``▁`` without a prefix, optionally ``<image>`` appended (256000 in
  ``Intel/llava-gemma-2b``), and the Gemma-it chat template.

No sentencepiece ``tokenizer.model`` is written; edgelmm and transformers both read ``tokenizer.json``.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from edgelmm.errors import ConfigError

STYLES = ("phi2", "llama", "gemma")

_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, \
detailed, and polite answers to the user's questions. USER: ASSISTANT: What is this? What's in the image?
Describe the picture in detail. What color is the car? How many people are there? Where was this photo taken?
The image shows a small brown dog sitting on a green lawn next to a red ball and a wooden fence.
There are two cats sleeping on the sofa, and a white cup of coffee is on the table near the window.
A man in a blue shirt is riding a bicycle down a busy street in the city while it is raining.
Three children are playing football in the park; one of them is wearing a yellow hat.
The sky is clear and the sun is shining over the mountains, the river and the old stone bridge.
She is reading a book in the kitchen, and he is cooking dinner with fresh vegetables and rice.
The train arrives at the station at 7:45 in the morning and leaves again at 8:10.
This is a photo of a large building with many windows, a tall tower and a flag on the roof.
The woman is holding an umbrella because the weather is cold, wet and windy today.
Answer the question using a single word or phrase. Please answer yes or no. Is there a person in the image?
Yes, there is. No, there isn't. I don't know. It looks like a kitchen. It seems to be a bedroom.
The text on the sign says "STOP". The number on the bus is 42. The price is $19.99 and the tax is 7%.
In 2024 the company sold 1,250,000 phones, which was 3.5 times more than in 2019.
The boy has 10 apples, gives away 3 and eats 2, so he has 5 apples left.
A plate of food with pizza, salad, bread, cheese, eggs, fruit, an orange, a banana and an apple.
An airplane is flying above the clouds; below it there are boats on the blue sea and a sandy beach.
The horse, the cow, the sheep and the bird are animals that live on the farm behind the house.
Look at the left side of the picture: a lamp, a chair, a desk, a computer, a phone and a clock.
On the right side you can see a tree, some flowers, grass, a road, a sign and a traffic light.
Small vision language models can run on edge devices such as phones, cameras and laptops.
The model reads the image, understands the question and writes a short, correct answer.
He said, "Thank you very much!" and she replied, 'You're welcome.' They were happy.
Can you tell me what time it is? It's about half past four in the afternoon, I think.
The temperature was 21 degrees; the room was 4.5 meters long and 3 meters wide.
Men, women, girls and boys were walking, talking, laughing and running near the water.
First, open the box. Second, take out the parts. Third, read the manual; then build it!
Black, white, gray, pink, purple, orange, gold and silver are also colors we often see.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
zero one two three four five six seven eight nine ten hundred thousand million first last
0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 99 100 365 1000 2023 2025 0.5 1/2 3:30 #1 @home 100% x+y=z a*b-c
! " # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~
Would you like to know more about this image? Sure, I can help with that question.
The quick brown fox jumps over the lazy dog. Every good picture tells a story about the world.
"""

_BYTES = [f"<0x{b:02X}>" for b in range(256)]
_PHI_WHITESPACE = [" " * n for n in range(8, 1, -1)] + ["\t" * n for n in range(4, 1, -1)]
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def _train(pre_tokenizer, n_tokens: int, alphabet: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Train BPE on the corpus for ``n_tokens`` tokens (fewer if the corpus runs out of merges, more if
    its alphabet alone is larger); return the tokens in id order and the merges."""
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=max(n_tokens, 0), initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


def _bpe(tokens: list[str], merges: list[tuple[str, str]], **options) -> Tokenizer:
    """A BPE tokenizer whose token ``i`` is ``tokens[i]``."""
    if len(set(tokens)) != len(tokens):
        raise ConfigError("a trained token collides with a reserved token; change the tiny corpus")
    return Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None, **options))


def _phi2(base: int) -> Tokenizer:
    byte_level = pre_tokenizers.ByteLevel
    trained, merges = _train(byte_level(add_prefix_space=False), base - 1, byte_level.alphabet())
    options = {"continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False}
    tok = _bpe(trained + ["<|endoftext|>"], merges, **options)
    tok.pre_tokenizer = byte_level(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([_special("<|endoftext|>")])
    tok.add_tokens([AddedToken(ws, normalized=True) for ws in _PHI_WHITESPACE])
    return tok


def _sentencepiece_like(head: list[str], base: int, prefix: str, unk: str) -> Tokenizer:
    """BPE with byte fallback over ``head`` + bytes + trained tokens; ``prefix`` is the metaspace scheme."""
    head = head + _BYTES
    trained, merges = _train(
        pre_tokenizers.Metaspace(prepend_scheme=prefix, split=True), base - len(head), []
    )
    tok = _bpe(head + trained, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok.add_special_tokens([_special(t) for t in head if not t.startswith("<0x")])
    return tok


def _llama(base: int) -> Tokenizer:
    tok = _sentencepiece_like(["<unk>", "<s>", "</s>"], base, "always", "<unk>")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    strip = decoders.Strip(content=" ", left=1, right=0)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), strip]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _gemma(base: int) -> Tokenizer:
    head = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tok = _sentencepiece_like(head, base, "never", "<unk>")
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    return tok


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict]:
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {
        str(i): {f: getattr(t, f) for f in fields} for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _phi2_files(tok: Tokenizer, out: Path) -> dict:
    model = json.loads(tok.to_str())["model"]
    _write_json(out / "vocab.json", model["vocab"])
    merges = "".join(f"{a} {b}\n" for a, b in model["merges"])
    (out / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    _write_json(out / "added_tokens.json", {ws: tok.token_to_id(ws) for ws in _PHI_WHITESPACE})
    eot = "<|endoftext|>"
    return {
        "add_prefix_space": False,
        "bos_token": eot,
        "clean_up_tokenization_spaces": True,
        "eos_token": eot,
        "model_max_length": 2048,
        "pad_token": eot,
        "return_token_type_ids": False,
        "tokenizer_class": "CodeGenTokenizer",
        "unk_token": eot,
    }


def _llama_config(extras: list[str]) -> dict:
    pad = "<pad>" if "<pad>" in extras else "</s>"  # TinyLlama-Chat pads with </s>
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": pad,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }


def _gemma_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "chat_template": _GEMMA_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 8192,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _extras(style: str, image_token: bool | None, pad_token: bool | None) -> list[str]:
    """Tokens appended after the base vocabulary, validated against what the family supports."""
    image = style != "phi2" if image_token is None else image_token
    pad = style == "llama" if pad_token is None else pad_token
    if image and style == "phi2":
        raise ConfigError("phi2-based families splice the image at sentinel id -200; use image_token=False")
    if pad and style != "llama":
        raise ConfigError(f"the {style} tokenizer already has a pad token; use pad_token=False")
    return ["<image>"] * image + ["<pad>"] * pad


def write_tiny_tokenizer(
    style: str,
    out_dir: str | Path,
    vocab_size: int = 512,
    *,
    image_token: bool | None = None,
    pad_token: bool | None = None,
) -> dict:
    """Train and write a tiny tokenizer of ``style`` ("phi2", "llama", "gemma") into ``out_dir``.

    ``vocab_size`` is the exact number of ids the tokenizer defines, added tokens included (give the
    model that many embedding rows, or more); 400 to 1100 fits every style. ``image_token`` appends
    ``<image>`` after the base vocabulary (default: on for llama and gemma, refused for phi2);
    ``pad_token`` appends ``<pad>`` after it (llama only, default on; without it pad is ``</s>`` as in
    TinyLlama-Chat).

    Returns the token ids under ``bos``, ``eos``, ``pad``, ``unk``, ``image`` (None without one) and, for
    gemma, ``start_of_turn`` / ``end_of_turn``; plus ``vocab_size`` and ``base_vocab_size`` (ids before the
    appended ``<image>``/``<pad>``; for phi2, before the whitespace added tokens).
    """
    if style not in STYLES:
        raise ConfigError(f"unknown tokenizer style {style!r}; expected one of {STYLES}")
    extras = _extras(style, image_token, pad_token)
    n_fixed = len(_PHI_WHITESPACE) if style == "phi2" else 0
    base = vocab_size - len(extras) - n_fixed
    tok = {"phi2": _phi2, "llama": _llama, "gemma": _gemma}[style](base)
    tok.add_special_tokens([_special(t) for t in extras])
    actual = tok.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:
        bound = "at least" if actual > vocab_size else "at most"
        raise ConfigError(
            f"vocab_size {vocab_size} does not fit the {style} style and its built-in corpus; "
            f"use {bound} {actual}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    if style == "phi2":
        config = _phi2_files(tok, out)
    else:
        config = _llama_config(extras) if style == "llama" else _gemma_config()
        if extras:
            _write_json(out / "added_tokens.json", {t: tok.token_to_id(t) for t in extras})
    _write_json(out / "tokenizer_config.json", {"added_tokens_decoder": _added_tokens_decoder(tok), **config})
    special_keys = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    _write_json(out / "special_tokens_map.json", {k: config[k] for k in special_keys if k in config})
    return _report(style, tok, config, base)


def _report(style: str, tok: Tokenizer, config: dict, base: int) -> dict:
    names = {name: config[f"{name}_token"] for name in ("bos", "eos", "pad", "unk")}
    names["image"] = "<image>"
    if style == "gemma":
        names.update(start_of_turn="<start_of_turn>", end_of_turn="<end_of_turn>")
    ids = {key: tok.token_to_id(token) for key, token in names.items()}
    return {**ids, "vocab_size": tok.get_vocab_size(with_added_tokens=True), "base_vocab_size": base}
