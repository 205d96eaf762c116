"""Tokenizer of a checkpoint folder, built on the ``tokenizers`` package only (no torch, no transformers).

Files, first usable wins:

1. ``tokenizer.json`` (every supported family ships one or can be given one);
2. ``vocab.json`` + ``merges.txt``: GPT-2 / Phi-2 byte-level BPE, with the added tokens declared in
   ``added_tokens.json`` and ``tokenizer_config.json`` (``added_tokens_decoder``).

In both cases tokens declared in ``added_tokens_decoder`` / ``added_tokens.json`` but missing from the
tokenizer are added at their declared ids. A folder with only a sentencepiece ``tokenizer.model`` is refused
with instructions to create ``tokenizer.json``.

Special-token ids (``bos``, ``eos``, ``pad``), first source that gives one wins:

1. the token named by ``<name>_token`` in ``tokenizer_config.json``, then in ``special_tokens_map.json``;
2. ``<name>_token_id`` in ``generation_config.json`` (first entry if it is a list);
3. ``<name>_token_id`` in ``config.json``, top level then ``text_config``.

The tokenizer files come first because some configs carry wrong defaults: Mipha-3B's ``config.json`` says
bos=1, eos=2 (PhiConfig defaults), while its Phi-2 tokenizer uses ``<|endoftext|>`` = 50256 for both.

User text is tokenized as text: a special token written inside it (``<|endoftext|>``, ``<end_of_turn>``)
becomes the ids of its characters, as transformers' ``split_special_tokens`` does, so that only the
template's own special tokens are real (:meth:`Tokenizer.encode_prompt`).

Decoding is the plain ``tokenizers`` decode: ``clean_up_tokenization_spaces`` is ignored, as transformers 5
ignores it for BPE tokenizers.
"""

import json
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from edgelmm.errors import CheckpointError, ConfigError

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# a non-special added token put in front of a piece encoded alone, so that the piece is tokenized as it
# is in the middle of the prompt (Metaspace's prepend_scheme="first" marks only the text at offset 0)
_CONTEXT_SENTINEL = "\ue000edgelmm-context\ue001"
_MAKE_TOKENIZER_JSON = (
    'python -c "from transformers import AutoTokenizer; '
    "AutoTokenizer.from_pretrained('{0}').save_pretrained('{0}')\""
)


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or ``{}`` if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path} is not readable JSON ({err}); copy it again from the original checkpoint"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object; copy it again from the original checkpoint")
    return data


def _content(entry) -> str | None:
    """The text of a special-token entry, written either as a string or as ``{"content": ...}``."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _missing_tokenizer(folder: Path) -> CheckpointError:
    bpe_files = [name for name in ("vocab.json", "merges.txt") if (folder / name).is_file()]
    if len(bpe_files) == 1:
        other = "merges.txt" if bpe_files[0] == "vocab.json" else "vocab.json"
        return CheckpointError(
            f"{folder} has {bpe_files[0]} but no {other} and no tokenizer.json; "
            "copy the tokenizer files of the base model into the folder"
        )
    if (folder / "tokenizer.model").is_file():
        return CheckpointError(
            f"{folder} has only a sentencepiece tokenizer.model; edgelmm needs tokenizer.json. "
            "Create it once, on a machine with transformers and sentencepiece: "
            + _MAKE_TOKENIZER_JSON.format(folder)
        )
    return CheckpointError(
        f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt "
        "(GPT-2/Phi BPE); copy the tokenizer files of the base model into the folder"
    )


def _byte_level_bpe(folder: Path, add_prefix_space: bool) -> _Backend:
    """A GPT-2 / Phi-2 byte-level BPE tokenizer from ``vocab.json`` + ``merges.txt``."""
    try:
        backend = _Backend(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    except Exception as err:  # tokenizers raises plain Exception on malformed files
        raise CheckpointError(
            f"cannot read vocab.json/merges.txt in {folder} ({err}); copy them again"
        ) from err
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def _load_backend(folder: Path, tok_config: dict) -> _Backend:
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            return _Backend.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception on malformed files
            raise CheckpointError(
                f"cannot read {path} ({err}); copy it again from the original checkpoint"
            ) from err
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return _byte_level_bpe(folder, bool(tok_config.get("add_prefix_space", False)))
    raise _missing_tokenizer(folder)


def _special_names(*metas: dict) -> set[str]:
    """Every token a tokenizer config or special-tokens map names as special."""
    names = {_content(meta.get(key)) for meta in metas for key in _SPECIAL_KEYS}
    names.update(_content(t) for meta in metas for t in meta.get("additional_special_tokens", []))
    return names - {None}


def _declared_tokens(folder: Path, tok_config: dict, special: set[str]) -> dict[int, AddedToken]:
    """Added tokens by id, from ``added_tokens.json`` then ``added_tokens_decoder`` (which wins)."""
    declared = {
        int(idx): AddedToken(text, special=text in special, normalized=text not in special)
        for text, idx in _read_json(folder / "added_tokens.json").items()
    }
    for idx, spec in tok_config.get("added_tokens_decoder", {}).items():
        options = {
            k: spec[k] for k in ("lstrip", "rstrip", "single_word", "normalized", "special") if k in spec
        }
        declared[int(idx)] = AddedToken(spec["content"], **options)
    return declared


def _register(backend: _Backend, declared: dict[int, AddedToken]) -> None:
    """Add declared tokens the backend lacks, checking that each lands on its declared id."""
    present = backend.get_added_tokens_decoder()
    for idx in sorted(declared):
        token = declared[idx]
        if idx in present:
            continue
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(token.content)
        if got != idx:
            raise CheckpointError(
                f"added token {token.content!r} is declared with id {idx} but the vocabulary "
                f"gives it {got}; the tokenizer files disagree, copy them again"
            )


def _config_id(configs: list[dict], key: str) -> int | None:
    """The first integer ``key`` in ``configs`` (a list value gives its first entry)."""
    for config in configs:
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def _special_id(backend: _Backend, name: str, metas: tuple[dict, ...], id_configs: list[dict]) -> int | None:
    """Id of special token ``name`` ("bos", "eos", "pad"): the token the tokenizer files name, if the
    vocabulary has it, else ``<name>_token_id`` from the configs."""
    for meta in metas:
        text = _content(meta.get(f"{name}_token"))
        if text is not None and backend.token_to_id(text) is not None:
            return backend.token_to_id(text)
    return _config_id(id_configs, f"{name}_token_id")


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


class Tokenizer:
    """Text <-> token ids for one checkpoint. Build it with :meth:`Tokenizer.from_dir`."""

    def __init__(self, backend: _Backend, special_ids: dict[str, int | None], chat_template: str | None):
        """Wrap a ``tokenizers.Tokenizer``; ``special_ids`` maps ``"bos"``/``"eos"``/``"pad"`` to ids."""
        self._backend = backend
        self._special_ids = special_ids
        self._chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load the tokenizer of the checkpoint folder ``path`` (see the module docstring for the rules)."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a directory; pass the checkpoint folder")
        tok_config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        backend = _load_backend(folder, tok_config)
        _register(backend, _declared_tokens(folder, tok_config, _special_names(tok_config, special_map)))
        config = _read_json(folder / "config.json")
        id_configs = [_read_json(folder / "generation_config.json"), config, config.get("text_config") or {}]
        metas = (tok_config, special_map)
        special_ids = {name: _special_id(backend, name, metas, id_configs) for name in ("bos", "eos", "pad")}
        return cls(backend, special_ids, _chat_template(folder, tok_config))

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None if the checkpoint names none."""
        return self._special_ids["bos"]

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, or None if the checkpoint names none."""
        return self._special_ids["eos"]

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, or None if the checkpoint names none."""
        return self._special_ids["pad"]

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template of ``tokenizer_config.json`` (or ``chat_template.jinja``), else None."""
        return self._chat_template

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer defines, added tokens included (the embedding may have more rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<image>``, ``<bos>``...) become
        their ids; no special token is added except BOS in front when ``add_bos`` is true."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if not add_bos:
            return ids
        if self.bos_token_id is None:
            raise ConfigError("add_bos=True but this tokenizer has no BOS token; pass add_bos=False")
        return [self.bos_token_id, *ids]

    def encode_prompt(self, text: str, user_span: tuple[int, int], add_bos: bool) -> list[int]:
        """Token ids of ``text`` in which ``text[user_span[0]:user_span[1]]`` was typed by a user: special
        tokens written there are tokenized as plain text; those outside it (the template's) stay real.
        Equal to :meth:`encode` whenever the user's text holds no special token."""
        start, end = user_span
        if not any(token in text[start:end] for token in self.special_tokens):
            return self.encode(text, add_bos)
        encoding = self._backend.encode(text, add_special_tokens=False)
        special_ids = self.special_token_ids
        spans = [(offset, i) for offset, i in zip(encoding.offsets, encoding.ids) if i in special_ids]
        region_start = max((stop for (_, stop), _ in spans if stop <= start), default=0)
        region_end = min((first for (first, _), _ in spans if first >= end), default=len(text))
        before = [i for (_, stop), i in zip(encoding.offsets, encoding.ids) if stop <= region_start]
        after = [i for (first, _), i in zip(encoding.offsets, encoding.ids) if first >= region_end]
        ids = [*before, *self._encode_as_text(text[region_start:region_end], in_context=region_start > 0), *after]
        if not add_bos:
            return ids
        if self.bos_token_id is None:
            raise ConfigError("add_bos=True but this tokenizer has no BOS token; pass add_bos=False")
        return [self.bos_token_id, *ids]

    @cached_property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(t.content for t in self._backend.get_added_tokens_decoder().values() if t.special)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def _text_only_backend(self) -> _Backend:
        """A copy of the tokenizer that reads special tokens as text, with the context sentinel added."""
        backend = _Backend.from_str(self._backend.to_str())
        backend.add_tokens([AddedToken(_CONTEXT_SENTINEL, special=False, normalized=False)])
        backend.encode_special_tokens = True
        return backend

    def _encode_as_text(self, piece: str, in_context: bool) -> list[int]:
        """Ids of ``piece`` with special tokens read as text; ``in_context``: as if it did not start the text."""
        if not in_context:
            return self._text_only_backend.encode(piece, add_special_tokens=False).ids
        return self._text_only_backend.encode(_CONTEXT_SENTINEL + piece, add_special_tokens=False).ids[1:]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (``<image>``, ``</s>``...) are dropped unless asked for, and ids
        past the tokenizer's vocabulary (padded embedding rows) decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of the token spelled ``token`` exactly as in the vocabulary (e.g. ``"<image>"``), or None."""
        return self._backend.token_to_id(token)

    def decode_stream(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A fresh :class:`IncrementalDecoder` for streaming generated tokens."""
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Turns tokens arriving one at a time into text pieces whose concatenation is the full decode.

    Text is emitted only once it is stable: a token that ends inside a multi-byte UTF-8 character (byte
    fallback, byte-level BPE) is held back until the character is complete. Each step decodes a short window
    that starts one emitted chunk back, so sentencepiece's leading-space handling sees the same context as a
    full decode. Call :meth:`flush` at the end to get any held-back text (e.g. a dangling partial character,
    which decodes to U+FFFD exactly as the full decode does).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        """Stream with ``tokenizer``; ``skip_special_tokens`` as in :meth:`Tokenizer.decode`."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context for the text emitted last
        self._read = 0  # end of the text emitted so far

    def _pending(self) -> str:
        window = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        emitted = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        return window[len(emitted) :] if len(window) > len(emitted) else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the newly stable text (possibly empty)."""
        self._ids.append(token_id)
        piece = self._pending()
        if not piece or piece.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return piece

    def flush(self) -> str:
        """Return the text still held back and reset the decoder for a new stream."""
        piece = self._pending()
        self._ids, self._prefix, self._read = [], 0, 0
        return piece
