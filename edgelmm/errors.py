"""Typed errors raised by edgelmm. Every message says what is wrong and what to do about it."""


class EdgeLMMError(Exception):
    """Base class of every error edgelmm raises on purpose."""


class ImageError(EdgeLMMError, ValueError):
    """The image cannot be read: missing, unreadable, truncated, or of an unsupported kind."""


class ImageTooLargeError(ImageError):
    """The image exceeds the decompression-bomb pixel limit."""


class UnsupportedModelError(EdgeLMMError):
    """The checkpoint's ``model_type`` (or layout) is not one edgelmm can run."""


class CheckpointError(EdgeLMMError):
    """A checkpoint file is missing, truncated or corrupt."""


class ShapeMismatchError(CheckpointError):
    """A tensor in the checkpoint does not have the shape the config implies."""


class ChecksumError(CheckpointError):
    """A file's sha256 differs from the one recorded in edgelmm.json."""


class PromptTooLongError(EdgeLMMError, ValueError):
    """The prompt (text plus image tokens) does not fit the model's context."""


class ConfigError(EdgeLMMError, ValueError):
    """An argument or configuration value is invalid."""


class QuantizationError(EdgeLMMError):
    """A layer cannot be quantized (e.g. its Hessian stays non-positive-definite at the largest damp)."""


class MemoryBudgetError(EdgeLMMError):
    """The model, at the requested precision and context, cannot fit the given memory budget."""


class NonFiniteLogitsError(CheckpointError):
    """The model computed NaN or infinite logits: its weights or config numbers are damaged."""


class ModelBusyError(EdgeLMMError, RuntimeError):
    """This thread is still reading an unfinished ``stream()`` of the same model."""


class MissingDependencyError(EdgeLMMError):
    """An optional dependency (or its backend for this device) that a requested feature needs is not installed."""
