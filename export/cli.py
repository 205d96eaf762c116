"""The ``edgelmm export`` subcommand. Registering it imports nothing heavy: each format's exporter is
imported when the command runs.

Formats are dispatched through :data:`FORMATS` (format name -> runner taking the parsed arguments); a new
format adds its runner there and its options in :func:`add_export_parser`."""
from __future__ import annotations

import argparse
import signal


def _settings(args: argparse.Namespace):
    from edgelmm.export.gptq_settings import QuantSettings

    return QuantSettings(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
                         method=args.method, damp=args.damp, quantize_vision=args.quantize_vision,
                         quantize_lm_head=args.quantize_lm_head)


def _run_gptq(args: argparse.Namespace) -> None:
    from edgelmm.export.gptq_export import export_gptq

    export_gptq(args.model, args.out, _settings(args), args.calibration, args.samples, progress=not args.quiet)


def _run_onnx(args: argparse.Namespace) -> None:
    from edgelmm.export.onnx_export import export_onnx

    settings = None if args.bits == 16 else _settings(args)
    export_onnx(args.model, args.out, settings, args.target, args.accuracy_level,
                None if args.lm_head_bits == 16 else args.lm_head_bits, args.calibration, args.samples,
                progress=not args.quiet, vision_bits=args.vision_bits)


FORMATS = {"gptq": _run_gptq, "onnx": _run_onnx}


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through the staging folder's cleanup


def cmd_export(args: argparse.Namespace) -> None:
    """Run the exporter of ``args.format`` (SIGTERM aborts cleanly, leaving no output folder)."""
    from edgelmm.errors import ConfigError

    runner = FORMATS.get(args.format)
    if runner is None:
        raise ConfigError(f"unknown export format {args.format!r}; edgelmm exports {', '.join(sorted(FORMATS))}")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        runner(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_export_parser(sub) -> argparse.ArgumentParser:
    """Add ``export`` to the ``edgelmm`` subcommands ``sub``."""
    p = sub.add_parser("export", help="export a checkpoint as a quantized checkpoint (GPTQ) or ONNX graphs",
                       description="Export MODEL to the new folder OUT (written to a temporary folder beside it "
                                   "and renamed when complete; an existing OUT is never overwritten).")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("-o", "--out", required=True, help="output folder (must not exist)")
    p.add_argument("--format", default="gptq", help=f"output format: {', '.join(sorted(FORMATS))} (default gptq)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("gptq options")
    g.add_argument("--bits", type=int, choices=(4, 8, 16), default=4, help="16: unquantized (onnx only)")
    g.add_argument("--group-size", "--block-size", type=int, choices=(32, 64, 128, -1), default=128,
                   help="quantization group (= MatMulNBits block for onnx)")
    g.add_argument("--asym", action="store_true", help="asymmetric (zero point per group; written as gptq_v2)")
    g.add_argument("--act-order", action="store_true", help="GPTQ columns by descending activation (static groups)")
    g.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="rtn: round-to-nearest, no data")
    g.add_argument("--calibration", metavar="DIR", default=None,
                   help="folder with calibration.jsonl ({\"image\": path, \"prompt\": text} per line) or "
                        "prompts.txt (one prompt per line) plus images; default: built-in synthetic set")
    g.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    g.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, raised x10 on failure (0.01)")
    g.add_argument("--quantize-vision", action="store_true", help="also quantize the vision tower and connector")
    g.add_argument("--quantize-lm-head", action="store_true", help="also quantize the lm_head")
    o = p.add_argument_group("onnx options")
    o.add_argument("--target", choices=("cpu", "cuda"), default="cpu", help="cpu: fp32 graphs; cuda: fp16")
    o.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="MatMulNBits compute type: 4 = int8 (default on cpu), 0 = as the input (cuda)")
    o.add_argument("--lm-head-bits", type=int, choices=(4, 8, 16), default=8,
                   help="LM head bits (RTN) unless --quantize-lm-head (default 8; 16 = unquantized)")
    o.add_argument("--vision-bits", type=int, choices=(8, 16), default=None,
                   help="vision tower + connector: 8 = int8 per channel (default for quantized cpu exports), "
                        "16 = unquantized (default otherwise); --quantize-vision uses --bits instead")
    p.set_defaults(func=cmd_export)
    return p
