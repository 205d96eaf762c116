import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full-size shapes)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: full-size shape; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests (and the processes they start) keep edgelmm's cache out of the user's ~/.cache/edgelmm."""
    os.environ["EDGELMM_CACHE"] = str(tmp_path_factory.mktemp("edgelmm-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, layout="old", llm="phi") -> path of a tiny random checkpoint, made once."""
    from edgelmm.synthetic.replicas import make_tiny

    made = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(family: str, layout: str = "old", llm: str = "phi"):
        if (family, layout, llm) not in made:
            made[family, layout, llm] = make_tiny(family, root / f"{family}-{layout}-{llm}", layout=layout, llm=llm)
        return made[family, layout, llm]

    return get
