"""The ``edgelmm`` command line: ask, demo, make-tiny, plan, bench and export (each command imports what it runs
when it runs)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgelmm.errors import ConfigError, EdgeLMMError
from edgelmm.plan.memory import BNB_METHODS


def _sampling(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
            "top_k": args.top_k, "top_p": args.top_p}


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=BNB_METHODS, default=None,
                   help="quantize the LLM's linears with bitsandbytes while loading (pip install edgelmm[bnb])")
    p.add_argument("--quantize-vision", action="store_true", help="with --quantize: the vision tower's linears too")


def _print_timings(timings: dict[str, float], n_tokens: int) -> None:
    parts = [f"{k} {v * 1000:.0f} ms" for k, v in timings.items()]
    rate = f", {n_tokens / timings['decode']:.1f} tok/s" if timings.get("decode") else ""
    print(f"[{', '.join(parts)}; {n_tokens} tokens{rate}]", file=sys.stderr)


def _check_device(device: str | None) -> None:
    """Refuse a CUDA device on a machine where torch sees none (before any model is loaded)."""
    if device is None or not device.lower().startswith("cuda"):
        return
    try:
        import torch
    except ImportError:
        raise ConfigError(f"--device {device} needs PyTorch with CUDA, which is not installed; "
                          "omit --device to run on the CPU") from None
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available on this machine; "
                          "omit --device (or pass --device cpu) to run on the CPU")


def _image_argument(image: str):
    """``--image``: a path, or ``-`` for the image's bytes on standard input (refused when it is a terminal)."""
    if image != "-":
        return image
    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError("--image - reads the image from standard input, which is not a pipe or file here; "
                          "redirect the image into it: --image - < cat.jpg")
    from edgelmm.processing.image import read_stream

    return read_stream(sys.stdin.buffer, "standard input")


def cmd_ask(args) -> None:
    from edgelmm.api import EdgeLMM, Generation, check_prompt
    from edgelmm.sampling import SamplingParams

    SamplingParams(**_sampling(args))  # bad values are refused before the model loads
    check_prompt(args.prompt)
    _check_device(args.device)
    image = _image_argument(args.image)
    model = EdgeLMM.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                         quantize_vision=args.quantize_vision)
    result = Generation("", [], "")
    for piece in model.stream(image, args.prompt, result=result, **_sampling(args)):
        print(piece, end="", flush=True)
    print()
    _print_timings(result.timings, len(result.token_ids))


def cmd_make_tiny(args) -> None:
    from edgelmm.synthetic.replicas import make_tiny

    print(make_tiny(args.family, args.out, seed=args.seed, layout=args.layout, llm=args.llm))


def cmd_demo(args) -> None:
    import numpy as np

    from edgelmm.api import EdgeLMM
    from edgelmm.synthetic.replicas import make_tiny

    with tempfile.TemporaryDirectory(prefix="edgelmm-demo-") as tmp:
        folder = make_tiny(args.family, Path(tmp) / f"tiny-{args.family}")
        print(f"built a tiny random-weight {args.family} checkpoint in its real layout: {folder}")
        y, x = np.mgrid[0:240, 0:320]
        image = np.stack([x * 255 // 320, y * 255 // 240, (x + y) % 256], axis=-1).astype(np.uint8)
        model = EdgeLMM.load(folder)
        question = "What is in the picture?"
        result = model.generate(image, question, max_new_tokens=args.max_new_tokens)
        print(f"prompt: {result.prompt!r}")
        print(f"answer (random weights, so gibberish): {result.text!r}")
        _print_timings(result.timings, len(result.token_ids))


def cmd_plan(args) -> None:
    import json

    from edgelmm.backends.onnx.config import is_onnx_export
    from edgelmm.plan.memory import PlanSettings, parse_size
    from edgelmm.plan.sources import plan_for

    settings = PlanSettings(bits=args.bits, group_size=args.group_size, kv_bits=8 if args.kv == "int8" else 16,
                            context=args.context, quantize_vision=args.quantize_vision,
                            quantize_lm_head=args.quantize_lm_head, overhead=parse_size(args.overhead),
                            bnb=args.quantize)
    if is_onnx_export(Path(args.model).expanduser()) and (args.bits != 16 or args.kv != "fp16" or args.quantize_vision
                                                          or args.quantize_lm_head):
        print("edgelmm plan: an ONNX export is planned as exported; --bits, --kv and --quantize-* are ignored",
              file=sys.stderr)
    plan = plan_for(args.model, settings, parse_size(args.memory) if args.memory else None)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else f"{args.model}:\n{plan.table()}")


def cmd_bench(args) -> None:
    from edgelmm.bench.command import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    from edgelmm.synthetic.replicas import REPLICAS

    parser = argparse.ArgumentParser(prog="edgelmm", description="Run small vision-language models on the edge.")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer a question about an image")
    ask.add_argument("model", help="checkpoint folder")
    ask.add_argument("--image", required=True, help="image file, or - to read it from standard input")
    ask.add_argument("--prompt", required=True)
    ask.add_argument("--device", default=None)
    ask.add_argument("--dtype", default=None)
    _add_quantize(ask)
    _add_sampling(ask)
    ask.set_defaults(func=cmd_ask)
    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in a family's real layout")
    tiny.add_argument("family", choices=(*REPLICAS, "tinygpt-v"))
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layout", choices=("old", "new"), default="old", help="HF Llava key layout")
    tiny.add_argument("--llm", choices=("phi", "llama", "gemma", "qwen2"), default="phi",
                      help="TinyLLaVA Factory language model")
    tiny.set_defaults(func=cmd_make_tiny)
    plan = sub.add_parser("plan", help="memory budget per part, and whether it fits")
    plan.add_argument("model", help="checkpoint, GPTQ or ONNX export folder, TinyGPT-V description file, or a "
                      "full-size shape: tinyllava-phi2-siglip-3.1b, mipha-3b, llava-gemma-2b, tiny-llava-1.1b, "
                      "tinygpt-v")
    plan.add_argument("--bits", type=int, choices=(4, 8, 16), default=16, help="LLM weight bits (16: fp16)")
    plan.add_argument("--group-size", type=int, default=128)
    plan.add_argument("--kv", choices=("fp16", "int8"), default="fp16")
    plan.add_argument("--context", type=int, default=2048)
    plan.add_argument("--memory", help="budget, e.g. 8GB")
    plan.add_argument("--overhead", default="0", help="runtime context to add, e.g. 300MB for a CUDA context")
    plan.add_argument("--quantize-vision", action="store_true")
    plan.add_argument("--quantize", choices=BNB_METHODS, default=None,
                      help="plan bitsandbytes' load-time quantization of the LLM's linears (instead of --bits)")
    plan.add_argument("--quantize-lm-head", action="store_true")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)
    demo = sub.add_parser("demo", help="make a tiny model and ask it about a synthetic image, offline")
    demo.add_argument("--family", choices=REPLICAS, default="tinyllava")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="latency, memory and bandwidth of the backends and peer runtimes")
    from edgelmm.bench.command import add_arguments  # argparse only (stdlib imports): the benchmark loads when it runs

    add_arguments(bench).set_defaults(func=cmd_bench)
    from edgelmm.export.cli import add_export_parser  # light: the exporters load when the command runs

    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EdgeLMMError as e:
        print(f"edgelmm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
