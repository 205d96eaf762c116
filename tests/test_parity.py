"""Each family's tiny replica, saved in its real layout, against an independent transformers reference:
prompt logits within 1e-4 of the logit scale (fp32), and 16 identical greedy tokens."""
import pytest
import torch
from reference import reference_for, sample_image

from edgelmm import EdgeLMM
from edgelmm.synthetic.replicas import REPLICA_FAMILY, REPLICAS

# (family, HF key layout, Factory LLM) covering every on-disk layout make-tiny writes
CASES = ([(f, "old", "phi") for f in REPLICAS] + [("llava-gemma", "new", "phi"), ("tiny-llava-hf", "new", "phi")]
         + [("tinyllava", "old", llm) for llm in ("llama", "gemma", "qwen2")])
STEPS = 16
QUESTION = "What is in the picture?"


def edgelmm_prompt_logits(model: EdgeLMM, image, question: str) -> torch.Tensor:
    """All prompt positions' logits [T, V] from edgelmm (API path up to the decoder)."""
    backend = model.backend
    return backend.prompt_logits(model.prompt_ids(question)[1], backend.encode_image(model.pixels(image)))


@pytest.mark.parametrize("family,layout,llm", CASES)
def test_logits_and_greedy_tokens_match_reference(tiny_checkpoint, family, layout, llm):
    folder = tiny_checkpoint(family, layout, llm)
    ref = reference_for(folder, family)
    model = EdgeLMM.load(folder)
    image = sample_image()

    assert model.prompt_ids(QUESTION)[1] == _expand(ref.prompt_ids(QUESTION), model)
    ref_logits, ref_tokens = ref.greedy(image, QUESTION, STEPS)
    ours = edgelmm_prompt_logits(model, image, QUESTION)
    assert ours.shape == ref_logits.shape
    scale = ref_logits.abs().max()
    assert (ours - ref_logits).abs().max() / scale < 1e-4

    result = model.generate(image, QUESTION, max_new_tokens=STEPS, stop_token_ids=())
    expected = _until_stop(ref_tokens, model.stop_ids)
    assert result.token_ids == expected

    # The image path must matter: a mirrored image changes the reference's answer, and ours follows it.
    mirrored = image.transpose(0)  # FLIP_LEFT_RIGHT
    _, ref_mirrored = ref.greedy(mirrored, QUESTION, STEPS)
    assert ref_mirrored != ref_tokens
    assert model.generate(mirrored, QUESTION, max_new_tokens=STEPS).token_ids == _until_stop(ref_mirrored,
                                                                                            model.stop_ids)


def _expand(ids: list[int], model: EdgeLMM) -> list[int]:
    """Reference ids with LLaVA's single sentinel expanded to one placeholder per image token."""
    n = model.spec.vision.num_image_tokens
    out = []
    for i in ids:
        out.extend([i] * n if i == -200 else [i])
    return out


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


@pytest.mark.parametrize("replica", REPLICAS)
def test_each_replica_is_detected_as_its_family(tiny_checkpoint, replica):
    """A replica (named after the released checkpoint it copies) loads as the family its config.json declares."""
    assert EdgeLMM.load(tiny_checkpoint(replica)).spec.family == REPLICA_FAMILY[replica]
