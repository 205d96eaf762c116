"""edgelmm: a quantized edge inference runtime for small vision-language models."""
from edgelmm.errors import EdgeLMMError

__all__ = ["EdgeLMM", "EdgeLMMError", "Generation", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name):  # torch is imported only when the torch backend is used
    if name in ("EdgeLMM", "Generation"):
        from edgelmm import api
        return getattr(api, name)
    if name == "SamplingParams":
        from edgelmm.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'edgelmm' has no attribute {name!r}")
