"""The runtime with its Triton kernels (EDGELMM_KERNELS=triton, run by Triton's interpreter on the CPU)
gives the same logits and greedy tokens as with the torch references, on tiny models (a CI-sized subset)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("triton")

SCRIPT = """
import json, sys
import numpy as np
from edgelmm import EdgeLMM
from reference import sample_image
model = EdgeLMM.load(sys.argv[1], context_length=1024)
backend = model.backend
ids = model.prompt_ids("What is it?")[1]
logits = backend.prompt_logits(ids, backend.encode_image(model.pixels(sample_image())))[-1]
tokens = model.generate(sample_image(), "What is it?", max_new_tokens=4).token_ids
print(json.dumps({"backend": backend.model.text.layers[0].self_attn.ops.backend,
                  "logits": logits.tolist(), "tokens": tokens}))
"""


def run(folder, kernels: str) -> dict:
    env = {**os.environ, "EDGELMM_KERNELS": kernels, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gptq4(tiny_checkpoint, tmp_path_factory):
    """A 4-bit g32 RTN export of the tiny TinyLLaVA (quantized linears run through gptq_matmul)."""
    from edgelmm.export.gptq_export import export_gptq
    from edgelmm.export.gptq_settings import QuantSettings

    out = tmp_path_factory.mktemp("wired") / "gptq4"
    export_gptq(tiny_checkpoint("tinyllava"), out, QuantSettings(bits=4, group_size=32, method="rtn"), samples=2,
                progress=False)
    return out


@pytest.mark.parametrize("family", ["tinyllava", "llava-gemma", "gptq4"])
def test_triton_kernels_match_torch_references(tiny_checkpoint, request, family):
    folder = request.getfixturevalue("gptq4") if family == "gptq4" else tiny_checkpoint(family)
    torch_run, triton_run = run(folder, "torch"), run(folder, "triton")
    assert (torch_run["backend"], triton_run["backend"]) == ("torch", "triton")
    ours, ref = np.array(triton_run["logits"]), np.array(torch_run["logits"])
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    assert triton_run["tokens"] == torch_run["tokens"]
