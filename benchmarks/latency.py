"""Latency benchmark of edgelmm's backends and peer runtimes; the same as ``edgelmm bench`` (see
edgelmm/bench/command.py for the options, the measurement protocol and the JSON schema)::

    python benchmarks/latency.py --shape tinyllava-phi2-siglip-3.1b --prompt-tokens 800 --new-tokens 128 \\
        --backends torch,gptq4,onnx4 --peers transformers,llama.cpp,ort-genai --json out.json --plot out.png
"""
import sys

from edgelmm.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
