import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("tinyllava", "tinyllava-legacy", "llava-gemma", "tiny-llava-hf", "mipha")
# (family, HF key layout) pairs covering every on-disk layout make-tiny writes
LAYOUTS = [(f, "old") for f in FAMILIES] + [("llava-gemma", "new"), ("tiny-llava-hf", "new")]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, layout="old") -> path of a tiny random checkpoint, made once per session."""
    from edgelmm.tiny import make_tiny

    made = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(family: str, layout: str = "old"):
        if (family, layout) not in made:
            made[family, layout] = make_tiny(family, root / f"{family}-{layout}", layout=layout)
        return made[family, layout]

    return get
