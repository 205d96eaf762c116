"""GPTQ vs RTN export quality: for 4-bit RTN and GPTQ at group sizes 32 and 128, the next-token top-1
agreement with the fp32 model and the mean KL(fp32 || quantized), over every text position after the image of
held-out (image, prompt) pairs that the calibration never saw.

    python benchmarks/quality.py [MODEL] [--samples 16] [--heldout 8] [--json results.json]

MODEL is any checkpoint folder edgelmm loads; without it a tiny random-weight TinyLLaVA replica is made (its
numbers test the pipeline, not real-model quality). GPTQ calibrates on the built-in synthetic set.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgelmm import EdgeLMM
from edgelmm.export.calibration import synthetic_image
from edgelmm.export.gptq_export import export_gptq
from edgelmm.export.gptq_settings import QuantSettings
from edgelmm.models.kv_cache import KVCache
from edgelmm.synthetic.replicas import make_tiny

CONFIGS = [("rtn", 32), ("gptq", 32), ("rtn", 128), ("gptq", 128)]
HELDOUT_PROMPTS = ("What stands out most in this image?", "Give a one-line description.",
                   "Which part of the image is darkest?", "Could this be a photograph? Explain.",
                   "What would you name this picture?", "Describe the textures you see.")
FIELDS = ("method", "bits", "group_size", "top1_agreement", "mean_kl", "positions", "export_seconds")


def text_logits(lm: EdgeLMM, image, prompt: str) -> torch.Tensor:
    """Log-probabilities [P, V] of the next token at every prompt position after the last image token."""
    model, t = lm.backend.model, lm.spec.text
    _, ids = lm.prompt_ids(prompt)
    with torch.inference_mode():
        embeds = model.splice(torch.tensor([ids]), lm.backend.encode_image(lm.pixels(image)))  # (1, T, D)
        logits = model.text(embeds, KVCache(t.num_layers, t.num_kv_heads, t.head_dim, len(ids)), 0, False)[0]
    marks = set(lm.spec.image_ids)
    first = 1 + max(i for i, tok in enumerate(ids) if tok in marks)  # first text position after the image
    return F.log_softmax(logits[first:].float(), dim=-1)  # (P, V)


def compare(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> tuple[float, float, int]:
    """Top-1 agreement, mean KL(reference || quantized) and the number of positions compared."""
    p, q = torch.cat(reference), torch.cat(quantized)  # (P, V) log-probabilities
    agree = float((p.argmax(-1) == q.argmax(-1)).float().mean())
    kl = float(F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean())
    return agree, kl, p.shape[0]


def run(model_dir: Path, work: Path, samples: int, heldout: int) -> list[dict]:
    cases = [(synthetic_image(10_000 + i), HELDOUT_PROMPTS[i % len(HELDOUT_PROMPTS)]) for i in range(heldout)]
    fp32 = EdgeLMM.load(model_dir, device="cpu", dtype="float32")
    reference = [text_logits(fp32, image, prompt) for image, prompt in cases]
    del fp32
    rows = []
    for method, group in CONFIGS:
        out = work / f"{method}-g{group}"
        start = time.perf_counter()
        export_gptq(model_dir, out, QuantSettings(bits=4, group_size=group, method=method), samples=samples,
                    progress=False)
        seconds = time.perf_counter() - start
        quant = EdgeLMM.load(out, device="cpu", dtype="float32")
        agree, kl, positions = compare(reference, [text_logits(quant, image, prompt) for image, prompt in cases])
        rows.append(dict(zip(FIELDS, (method, 4, group, agree, kl, positions, seconds))))
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'method':<8}{'bits':>5}{'group':>7}{'top1 agree':>12}{'mean KL':>10}{'positions':>11}{'export s':>10}"]
    for r in rows:
        lines.append(f"{r['method']:<8}{r['bits']:>5}{r['group_size']:>7}{r['top1_agreement']:>12.3f}"
                     f"{r['mean_kl']:>10.4f}{r['positions']:>11}{r['export_seconds']:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="checkpoint folder (default: a tiny TinyLLaVA replica)")
    parser.add_argument("--samples", type=int, default=16, help="GPTQ calibration samples")
    parser.add_argument("--heldout", type=int, default=8, help="held-out (image, prompt) pairs")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="edgelmm-quality-") as tmp:
        model_dir = Path(args.model) if args.model else make_tiny("tinyllava", Path(tmp) / "tiny")
        rows = run(model_dir, Path(tmp), args.samples, args.heldout)
    print(f"4-bit export quality vs fp32 on {args.heldout} held-out prompts ({model_dir.name}):")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
