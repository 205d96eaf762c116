"""edgelmm.processing.tokenizer against transformers' AutoTokenizer, on the tiny tokenizers of every family."""

import json
import shutil
import subprocess
import sys

import pytest

from edgelmm.errors import CheckpointError, ConfigError
from edgelmm.processing.tokenizer import Tokenizer
from edgelmm.synthetic.tokenizers import STYLES, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
GEMMA_PROMPT = (
    "<bos><start_of_turn>user\n<image>\nWhat's the content of the image?<end_of_turn>\n<start_of_turn>model\n"
)
TRICKY = [
    "",
    " ",
    "  two leading spaces",
    " one leading space",
    "trailing spaces  ",
    "multiple   spaces\tand\ttabs\n\nlines",
    "Café naïve résumé Ångström “quotes” — dash … ellipsis",
    "日本語のテキストと中文，한국어",
    "emoji 😀👍🏽 🇯🇵 👩‍👩‍👧",
    "numbers 3.14159 2024-05-01 1,000,000 $19.99 42% 0x1F",
    "The quick brown fox jumps over the lazy dog.",
]
PROMPTS = TRICKY + [
    f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT:",
    "USER: <image>\nDescribe the picture.\nASSISTANT:",
    "###Human: <Img><ImageHere></Img> What color is the car?###Assistant: ",
    GEMMA_PROMPT,
    "literal specials: <s> </s> <unk> <pad> <eos> <|endoftext|> x < y > z",
]
SIZES = {"phi2": 600, "llama": 700, "gemma": 800}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """style -> (folder, ids reported by write_tiny_tokenizer)."""
    root = tmp_path_factory.mktemp("tok")
    return {
        style: (root / style, write_tiny_tokenizer(style, root / style, SIZES[style])) for style in STYLES
    }


@pytest.fixture(scope="module")
def hf(tiny):
    return {
        style: transformers.AutoTokenizer.from_pretrained(str(folder)) for style, (folder, _) in tiny.items()
    }


@pytest.fixture(scope="module")
def ours(tiny):
    return {style: Tokenizer.from_dir(folder) for style, (folder, _) in tiny.items()}


@pytest.mark.parametrize("style", STYLES)
def test_ids_match_transformers(style, hf, ours):
    ref, tok = hf[style], ours[style]
    for text in PROMPTS:
        assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.encode(text, add_bos=style != "phi2") == ref(text)["input_ids"], text


@pytest.mark.parametrize("style", STYLES)
def test_decode_matches_transformers(style, hf, ours):
    ref, tok = hf[style], ours[style]
    for text in PROMPTS:
        ids = tok.encode(text, add_bos=True)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (
                text
            )
    for text in TRICKY:  # byte-level and byte fallback round-trip any text...
        if style == "llama" and text.startswith(" "):  # ...but Metaspace skips the prefix if one is there
            continue
        assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("style", STYLES)
def test_common_words_are_single_tokens(style, ours):
    tok = ours[style]
    for word in ("the", "and", "image", "picture", "question"):
        assert len(tok.encode(f"a {word}", add_bos=False)) == 2, word


@pytest.mark.parametrize("style", STYLES)
def test_streaming_concatenation_equals_full_decode(style, ours):
    tok = ours[style]
    texts = TRICKY + [" ".join(TRICKY), GEMMA_PROMPT + "It's a 🐈 on a sofa.<end_of_turn>"]
    for text in texts:
        ids = tok.encode(text, add_bos=True)
        for skip in (True, False):
            stream = tok.decode_stream(skip_special_tokens=skip)
            pieces = [stream.push(i) for i in ids]
            assert "".join(pieces) + stream.flush() == tok.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in p for p in pieces), pieces
        stream = tok.decode_stream()  # a generation that starts mid-text
        assert "".join(stream.push(i) for i in ids[3:]) + stream.flush() == tok.decode(ids[3:])


def test_streaming_holds_back_partial_utf8_and_flushes_it(ours):
    tok = ours["llama"]
    ids = tok.encode("a😀", add_bos=False)  # 😀 is four byte-fallback tokens
    stream = tok.decode_stream()
    assert [stream.push(i) for i in ids] == ["a", "", "", "", "😀"] and stream.flush() == ""
    assert [stream.push(i) for i in ids[:-1]] == ["a", "", "", ""]  # flush reset the stream
    assert stream.flush() == "\ufffd" * 3 and tok.decode(ids[:-1]) == "a" + "\ufffd" * 3


@pytest.mark.parametrize("style", STYLES)
def test_special_ids(style, tiny, hf, ours):
    _, ids = tiny[style]
    tok, ref = ours[style], hf[style]
    n = SIZES[style]
    assert tok.vocab_size == ids["vocab_size"] == len(ref) == n
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    expected = {
        "phi2": {"bos": n - 11, "eos": n - 11, "pad": n - 11, "unk": n - 11, "image": None},
        "llama": {"bos": 1, "eos": 2, "pad": n - 1, "unk": 0, "image": n - 2},
        "gemma": {
            "bos": 2,
            "eos": 1,
            "pad": 0,
            "unk": 3,
            "image": n - 1,
            "start_of_turn": 5,
            "end_of_turn": 6,
        },
    }[style]
    expected["base_vocab_size"] = n - 10 if style == "phi2" else expected["image"]
    assert {k: ids[k] for k in expected} == expected
    assert tok.token_to_id("<image>") == ids["image"]
    assert tok.token_to_id("no such token") is None


def test_gemma_chat_template(hf, ours):
    messages = [{"role": "user", "content": "<image>\nWhat's the content of the image?"}]
    text = hf["gemma"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == GEMMA_PROMPT
    assert ours["gemma"].chat_template == hf["gemma"].chat_template
    assert ours["phi2"].chat_template is None and ours["llama"].chat_template is None
    ids = ours["gemma"].encode(text, add_bos=False)
    assert ids[:2] == [2, 5] and ids.count(ours["gemma"].token_to_id("<image>")) == 1 and ids[-1] == 17


def test_vocab_merges_fallback_matches_tokenizer_json(tiny, ours, tmp_path):
    folder = tmp_path / "phi2"
    shutil.copytree(tiny["phi2"][0], folder)
    (folder / "tokenizer.json").unlink()
    fallback, full = Tokenizer.from_dir(folder), ours["phi2"]
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in PROMPTS:
        ids = full.encode(text, add_bos=False)
        assert fallback.encode(text, add_bos=False) == ids == ref(text)["input_ids"], text
        assert fallback.decode(ids, skip_special_tokens=False) == full.decode(ids, skip_special_tokens=False)
        assert fallback.decode(ids) == full.decode(ids)
    assert fallback.vocab_size == full.vocab_size
    assert (fallback.bos_token_id, fallback.eos_token_id, fallback.pad_token_id) == (
        full.bos_token_id,
        full.eos_token_id,
        full.pad_token_id,
    )


def test_tokenizer_files_beat_config_ids(tiny, tmp_path):
    """Mipha's config.json carries PhiConfig's bos=1/eos=2; the tokenizer's <|endoftext|> must win."""
    folder = tmp_path / "mipha"
    shutil.copytree(tiny["phi2"][0], folder)
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 7}))
    eot = tiny["phi2"][1]["eos"]
    assert (Tokenizer.from_dir(folder).bos_token_id, Tokenizer.from_dir(folder).eos_token_id) == (eot, eot)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink()
    assert Tokenizer.from_dir(folder).pad_token_id == 7
    (folder / "generation_config.json").write_text(json.dumps({"pad_token_id": 9, "eos_token_id": [5, 6]}))
    tok = Tokenizer.from_dir(folder)
    assert (tok.pad_token_id, tok.eos_token_id) == (9, eot)


def test_missing_or_unusable_tokenizer_files(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "absent")
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    with pytest.raises(CheckpointError, match="needs tokenizer.json.*save_pretrained"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tiny["phi2"][0] / "vocab.json", tmp_path)
    with pytest.raises(CheckpointError, match="no merges.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        Tokenizer.from_dir(tmp_path)


def test_declared_id_disagreeing_with_vocabulary_is_refused(tiny, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny["llama"][0], folder)
    (folder / "added_tokens.json").write_text(json.dumps({"<video>": SIZES["llama"] + 5}))
    with pytest.raises(CheckpointError, match="<video>"):
        Tokenizer.from_dir(folder)


def test_add_bos_without_bos_token(tiny, tmp_path):
    folder = tmp_path / "nobos"
    shutil.copytree(tiny["phi2"][0], folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((folder / name).read_text())
        data.pop("bos_token")
        (folder / name).write_text(json.dumps(data))
    tok = Tokenizer.from_dir(folder)
    assert tok.bos_token_id is None
    with pytest.raises(ConfigError, match="no BOS"):
        tok.encode("hi", add_bos=True)


@pytest.mark.parametrize("style, size", [("phi2", 300), ("llama", 400), ("gemma", 1000)])
def test_tiny_vocab_size_is_exact(style, size, tmp_path):
    assert write_tiny_tokenizer(style, tmp_path, size)["vocab_size"] == size
    assert Tokenizer.from_dir(tmp_path).vocab_size == size


def test_tiny_tokenizer_options(tmp_path):
    ids = write_tiny_tokenizer("llama", tmp_path / "a", 500, image_token=False, pad_token=False)
    assert (ids["image"], ids["pad"], ids["vocab_size"], ids["base_vocab_size"]) == (None, 2, 500, 500)
    with pytest.raises(ConfigError, match="at most"):
        write_tiny_tokenizer("gemma", tmp_path / "b", 100_000)
    with pytest.raises(ConfigError, match="at least"):
        write_tiny_tokenizer("llama", tmp_path / "c", 100)
    with pytest.raises(ConfigError, match="sentinel"):
        write_tiny_tokenizer("phi2", tmp_path / "d", 500, image_token=True)
    with pytest.raises(ConfigError, match="unknown tokenizer style"):
        write_tiny_tokenizer("bert", tmp_path / "e", 500)


def test_import_pulls_in_neither_torch_nor_transformers():
    code = (
        "import sys, edgelmm.processing.tokenizer, edgelmm.synthetic.tokenizers; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
