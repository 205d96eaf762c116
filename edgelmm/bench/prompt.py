"""The benchmark prompt: a question about one image, padded with real text tokens to an exact length, and
its text-only twin for the peers that run a language model alone."""
from __future__ import annotations

QUESTION = "What is in the picture? Describe it in detail."
FILLER = ("The photograph was taken on a bright afternoon in a small harbour town. Fishing boats rest against the "
          "stone quay, gulls circle above the masts, and a few people walk along the water with bags of bread and "
          "fruit from the market. Behind them, painted houses climb the hill towards an old church. ")

def filler_ids(tokenizer, n: int) -> list[int]:
    """``n`` real text token ids: the tokenized FILLER prose, repeated as needed."""
    ids = tokenizer.encode(FILLER, add_bos=False)
    return (ids * (n // len(ids) + 1))[:n]


def bench_prompt(lm, prompt_tokens: int) -> list[int]:
    """The prompt ids of QUESTION about one image, text padded with FILLER tokens (inserted right after the
    image) so that image tokens + text = ``prompt_tokens`` exactly. When the templated prompt is already
    longer (a random-weight shape's tiny tokenizer splits the system prompt finely), tokens of the system
    prompt before the image are dropped instead (the first token, e.g. BOS, is kept)."""
    from edgelmm.errors import ConfigError

    _, ids = lm.prompt_ids(QUESTION)
    marks = set(lm.spec.image_ids)
    first = min((i for i, t in enumerate(ids) if t in marks), default=len(ids))
    last = max((i for i, t in enumerate(ids) if t in marks), default=0) + 1
    need = prompt_tokens - len(ids)
    if need < 0 and first - 1 >= -need:
        return ids[:1] + ids[1 - need:]
    if need < 0:
        raise ConfigError(f"--prompt-tokens {prompt_tokens} is below this model's image tokens plus the question "
                          f"({len(ids) - first + 1}); use at least that")
    return ids[:last] + filler_ids(lm.tokenizer, need) + ids[last:]


def text_only(ids: list[int], marks: set[int], tokenizer) -> list[int]:
    """The same-length prompt for a language model alone: image positions become FILLER tokens."""
    fill = iter(filler_ids(tokenizer, len(ids)))
    return [next(fill) if t in marks else t for t in ids]
