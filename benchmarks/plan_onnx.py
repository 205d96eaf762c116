"""The memory plan of an ONNX export against the memory a real answer takes (torch-free).

    python benchmarks/plan_onnx.py EXPORT [--context N] [--prompt-words W] [--new-tokens T]

Loads EXPORT with a KV cache of ``--context`` positions (default: just what the prompt and answer need, so
every KV page is touched and the plan's full-cache figure is what is measured), answers a prompt of an image
plus ``--prompt-words`` words, and prints the process's peak RSS growth (Linux VmHWM, reset before loading)
beside ``edgelmm plan EXPORT --context N``.
"""
from __future__ import annotations

import argparse
import gc

import numpy as np
import onnxruntime  # noqa: F401  (imported before the baseline, as the backend imports it)
import tokenizers  # noqa: F401

from edgelmm import EdgeLMM
from edgelmm.plan.sources import plan_onnx_export
from edgelmm.process_memory import resident_bytes


def peak_resident_bytes() -> int:
    """VmHWM: the peak RSS since the process started or since :func:`reset_peak`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export")
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--prompt-words", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args()
    prompt = " ".join(["describe"] * args.prompt_words)
    image = (np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8)
    sizing = EdgeLMM.load(args.export, context_length=args.context)  # to count the prompt's tokens
    tokens = len(sizing.prompt_ids(prompt)[1])
    context = args.context or tokens + args.new_tokens
    del sizing
    gc.collect()
    baseline = resident_bytes()
    reset_peak()
    model = EdgeLMM.load(args.export, context_length=context)
    model.generate(image, prompt, max_new_tokens=args.new_tokens, stop_token_ids=())
    growth = peak_resident_bytes() - baseline
    plan = plan_onnx_export(args.export, context)
    print(f"{args.export}: prompt {tokens} tokens, context {context}")
    print(plan.table())
    print(f"measured peak RSS growth {growth / 1e9:.3f} GB vs plan {plan.total / 1e9:.3f} GB "
          f"({100 * (growth - plan.total) / plan.total:+.1f}%)")


if __name__ == "__main__":
    main()
