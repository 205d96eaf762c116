"""Image loading and preprocessing for the vision encoders, in numpy + Pillow only (no torch).

``load_image`` turns a path, bytes, PIL image or numpy array into an RGB PIL image the way the
LLaVA-family code does (``Image.open(f).convert("RGB")``) and raises typed errors for bad input.
``preprocess`` reproduces the math of transformers' ``SiglipImageProcessor`` / ``CLIPImageProcessor``
(PIL backend, ``...ImageProcessorPil`` in transformers 5.x), optionally after LLaVA's ``expand2square``.

Decisions (see ``load_image`` for the full list of accepted inputs):

- Alpha is dropped, not composited: LLaVA, TinyLLaVA and Mipha call ``.convert("RGB")`` before the
  processor. (transformers 5.x composites onto white when handed an RGBA image directly.)
- 16-bit data keeps its high byte (``v >> 8``), as Pillow does for 16-bit-per-channel RGB PNGs;
  Pillow's own ``I;16 -> RGB`` conversion saturates every value above 255 to white.
- No EXIF rotation is applied, as in the upstream pipelines.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgelmm.errors import ConfigError, ImageError, ImageTooLargeError

DEFAULT_MAX_PIXELS = 64_000_000
"""Default decompression-bomb guard for ``load_image``: 64 megapixels (e.g. 9000x8000 is refused)."""

MAX_ASPECT_RATIO = 50
"""``load_image`` refuses images whose long side is more than 50 times their short side. Padding to a square
or resizing the short side up multiplies such an image's pixels by its aspect ratio; real photos, panoramas
and scanned receipts stay far below 1:50."""

MAX_STREAM_BYTES = 256 << 20
"""The most an image read from a pipe may hold: 256 MiB, above a 64-megapixel uncompressed BMP (192 MB)."""

_PAD_STRIP_BYTES = 64 << 20
"""Padded resizes build the square canvas in horizontal strips of at most this many bytes."""

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
ResizeMode = Literal["square", "shortest_edge_crop"]

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_DAMAGED_HINT = "the file is incomplete or damaged; re-download or re-export it"


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``source`` as a new RGB ``PIL.Image.Image``.

    Accepted sources:

    - a path (``str`` or ``os.PathLike``) or the encoded bytes (``bytes``, ``bytearray``,
      ``memoryview``) of any format Pillow reads (JPEG, PNG, WebP, BMP, GIF, TIFF, ...);
      multi-frame files give their first frame;
    - a ``PIL.Image.Image`` of any mode Pillow can convert to RGB. Alpha (RGBA, LA, PA, palette
      transparency) is dropped, as ``Image.convert("RGB")`` does; 16-bit greyscale (``I;16*``, and
      ``I`` with values in [0, 65535]) keeps its high byte; ``F`` follows Pillow (0-255 scale);
    - a channels-last ``numpy.ndarray`` of shape HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped) with
      dtype ``uint8``, ``uint16`` (high byte kept) or floating point in [0, 1] (``round(v * 255)``).

    Images with more than ``max_pixels`` pixels raise ``ImageTooLargeError``; files are checked from
    their header, before any pixel is decoded. ``max_pixels=None`` disables this check (Pillow's own
    ``PIL.Image.MAX_IMAGE_PIXELS`` guard still applies to files). Every other bad input (missing,
    empty, truncated or non-image file, zero-size image, wrong array shape or dtype, unsupported type)
    raises ``ImageError``.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels <= 0):
        raise ConfigError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, "image", max_pixels)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(np.asarray(source), max_pixels)  # np.asarray: an np.matrix becomes an ndarray
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("image bytes are empty (0 bytes); pass the complete contents of an image file")
        return _decode(io.BytesIO(data), "image bytes", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(os.fsdecode(source), max_pixels)
    raise ImageError(f"cannot load an image from a {type(source).__name__}; pass a file path, the file's "
                     "bytes, a PIL.Image.Image or an HxWxC numpy array")


def _load_path(path: str, max_pixels: int | None) -> Image.Image:
    """Open and decode the image file at ``path``: a regular file, or this process's standard input when it is
    a pipe (``/dev/stdin``). Other non-regular files (a FIFO, a device) are refused before they are opened,
    since reading them may never end."""
    _check_file_name(path)
    try:
        info = os.stat(path)
        from_stdin = _is_stdin_pipe(info)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode) or from_stdin):
            raise ImageError(f"image path {path!r} is not a regular file (a FIFO, socket or device); "
                             "pass an image file, or pipe it to standard input")
        with open(path, "rb") as file:
            if from_stdin:
                return load_image(read_stream(file, f"standard input ({path})"), max_pixels)
            if os.fstat(file.fileno()).st_size == 0:
                raise ImageError(f"image file {path!r} is empty (0 bytes); {_DAMAGED_HINT}")
            return _decode(file, f"image file {path!r}", max_pixels)
    except FileNotFoundError:
        hint = ("; URLs are not fetched: download the image and pass its path or bytes"
                if path.startswith(("http://", "https://")) else "; check the path")
        raise ImageError(f"image file not found: {path!r}{hint}") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise ImageError(f"cannot read image file {path!r}: {exc.strerror or exc}") from exc


def _check_file_name(path: str) -> None:
    """Refuse a path the operating system cannot take: a NUL character, or one the file-system encoding
    cannot encode (a lone surrogate)."""
    if "\0" in path:
        raise ImageError(f"image path {path!r} is not a valid file name (it contains a NUL character); "
                         "check the path")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise ImageError(f"image path {path!r} is not a valid file name (character {exc.start} cannot be "
                         f"encoded in {exc.encoding}); check the path") from None


def _is_stdin_pipe(info: os.stat_result) -> bool:
    """Whether ``info`` describes this process's standard input (e.g. ``/dev/stdin``) and it is a pipe."""
    try:
        stdin = os.fstat(0)
    except OSError:
        return False
    return stat.S_ISFIFO(info.st_mode) and (stdin.st_dev, stdin.st_ino) == (info.st_dev, info.st_ino)


def read_stream(stream: IO[bytes], name: str) -> bytes:
    """Read an encoded image from a stream of unknown length (a pipe) to its end, at most
    ``MAX_STREAM_BYTES``; a longer stream raises ``ImageTooLargeError`` instead of filling memory."""
    data = stream.read(MAX_STREAM_BYTES + 1)
    if len(data) > MAX_STREAM_BYTES:
        raise ImageTooLargeError(f"{name} holds more than {MAX_STREAM_BYTES:,} bytes, more than any image "
                                 "load_image accepts; pass a file instead")
    if not data:
        raise ImageError(f"{name} is empty (0 bytes); pipe the complete contents of an image file")
    return data


def _decode(file: IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    """Parse the header of an encoded image, check its size, then decode it to RGB."""
    try:
        image = Image.open(file)
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image Pillow can read (unknown format or damaged header); "
                         "pass a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{name} is refused by Pillow's own decompression-bomb guard ({exc}); if you trust it, raise "
            "PIL.Image.MAX_IMAGE_PIXELS as well as load_image's max_pixels") from None
    except Exception as exc:
        raise ImageError(f"{name} cannot be opened ({type(exc).__name__}: {exc}); {_DAMAGED_HINT}") from exc
    with image:
        return _pil_to_rgb(image, name, max_pixels)


def _pil_to_rgb(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    """Check the size of a (possibly not yet decoded) PIL image, decode it and convert it to RGB."""
    _check_size(image.width, image.height, name, max_pixels)
    try:
        image.load()
    except Exception as exc:
        raise ImageError(f"{name}: image data is truncated or corrupt ({type(exc).__name__}: {exc}); "
                         f"{_DAMAGED_HINT}") from exc
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(np.asarray(image), name)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # same RGB as P -> RGB, without Pillow's palette-transparency warning
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"{name} has pixel mode {image.mode!r}, which Pillow cannot convert to RGB ({exc}); "
                         "convert it to RGB first") from exc


def _sixteen_bit_to_rgb(values: np.ndarray, name: str) -> Image.Image:
    """Convert the pixels of an ``I;16*`` or ``I`` image, which must lie in [0, 65535]."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ImageError(f"{name} is a 32-bit integer image with values in [{low}, {high}], outside the "
                         "16-bit range [0, 65535] it is read as; rescale it to uint8 first")
    return _array_to_rgb(values.astype(np.uint16), None)


def _array_to_rgb(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    """Convert a channels-last array (HxW, HxWx1, HxWx3, HxWx4) to an RGB image."""
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ImageError(f"image array has shape {array.shape}; expected HxW, HxWx1, HxWx3 or HxWx4 "
                         "(channels last; transpose a CxHxW array with array.transpose(1, 2, 0))")
    height, width = array.shape[:2]
    _check_size(width, height, "image array", max_pixels)
    pixels = _to_uint8(array)
    if pixels.ndim == 3:
        pixels = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., 0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(pixels))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Map uint8 / uint16 / float-in-[0, 1] pixel values to uint8."""
    if array.dtype.kind == "u" and array.dtype.itemsize == 1:
        return array
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return (array.astype(np.uint16) >> 8).astype(np.uint8)
    if array.dtype.kind == "f":
        low, high = float(np.min(array)), float(np.max(array))
        if not (low >= 0.0 and high <= 1.0):  # NaN fails both comparisons
            raise ImageError(f"float image array must hold values in [0, 1], got [{low}, {high}]; "
                             "divide 8-bit data by 255 or clip the array")
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise ImageError(f"image array has dtype {array.dtype}; expected uint8, uint16 or float in [0, 1] "
                     "(e.g. array.astype(np.uint8) for 0-255 integers)")


def _check_size(width: int, height: int, name: str, max_pixels: int | None) -> None:
    """Refuse empty images, images over the pixel limit and images beyond the aspect-ratio limit."""
    if width == 0 or height == 0:
        raise ImageError(f"{name} has zero size ({width}x{height}); pass an image with at least one pixel")
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} = {pixels:,} pixels, over the limit of {max_pixels:,} pixels "
            f"(a guard against decompression bombs); if you trust it, call load_image(..., "
            f"max_pixels={pixels}) or larger, or max_pixels=None to disable the check")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageTooLargeError(
            f"{name} is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):,.0f}:1, "
            f"over the limit of {MAX_ASPECT_RATIO}:1 (padding or resizing it would multiply its pixels); "
            "crop it to the part the question is about")


@dataclass(frozen=True)
class ImageSpec:
    """How a vision encoder wants its pixels: the parameters of the HF image processor, plus padding.

    - ``size``: side of the square output.
    - ``resize_mode``: ``"square"`` resizes straight to size x size (``SiglipImageProcessor``);
      ``"shortest_edge_crop"`` resizes the shortest edge to ``size`` (longest edge
      ``int(size * long / short)``) and centre-crops size x size (``CLIPImageProcessor``).
    - ``mean``, ``std``: per-channel normalisation, applied after multiplying by ``rescale_factor``.
    - ``pad_to_square``: LLaVA ``expand2square`` first: the image is pasted centred on a square
      canvas filled with ``pad_fill`` = ``int(m * 255)`` for each channel mean.
    - ``resample``: a ``PIL.Image.Resampling`` filter (HF ``resample``); bicubic for SigLIP and CLIP.
    """

    size: int
    resize_mode: ResizeMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_to_square: bool = False
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"ImageSpec.size must be a positive int, got {self.size!r}")
        if self.resize_mode not in ("square", "shortest_edge_crop"):
            raise ConfigError(f"ImageSpec.resize_mode must be 'square' or 'shortest_edge_crop', "
                              f"got {self.resize_mode!r}")
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))
        if min(self.std) <= 0:
            raise ConfigError(f"ImageSpec.std must be positive, got {self.std}")
        if self.pad_to_square and not all(0 <= m <= 1 for m in self.mean):
            raise ConfigError(f"pad_to_square needs a mean in [0, 1] for the fill colour, got {self.mean}")
        try:
            object.__setattr__(self, "resample", int(Image.Resampling(self.resample)))
        except (ValueError, TypeError):
            raise ConfigError(f"ImageSpec.resample must be a PIL.Image.Resampling value (0-5), "
                              f"got {self.resample!r}") from None
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise ConfigError(f"ImageSpec.rescale_factor must be positive, got {self.rescale_factor!r}")

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """The ``expand2square`` canvas colour: each channel mean x 255, truncated to int."""
        return tuple(int(m * 255) for m in self.mean)

    @classmethod
    def siglip(cls, size: int = 384, pad: bool = False) -> ImageSpec:
        """SigLIP (``SiglipImageProcessor``): resize to size x size, bicubic, mean = std = 0.5."""
        return cls(size, "square", SIGLIP_MEAN, SIGLIP_STD, pad_to_square=pad)

    @classmethod
    def clip(cls, size: int = 336, pad: bool = False) -> ImageSpec:
        """CLIP (``CLIPImageProcessor``): shortest edge to ``size``, centre crop, bicubic, OpenAI mean/std."""
        return cls(size, "shortest_edge_crop", CLIP_MEAN, CLIP_STD, pad_to_square=pad)

    @classmethod
    def from_preprocessor_config(cls, config: Mapping, pad: bool = False) -> ImageSpec:
        """Build the spec from an HF ``preprocessor_config.json`` dict (SigLIP or CLIP processor).

        Missing or null keys take the transformers class defaults, as ``from_pretrained`` does. Configs
        whose output is not one fixed square (``do_resize`` false, a crop size different from the
        resize size, ``longest_edge`` sizes, ...) raise ``ConfigError``. ``pad`` sets ``pad_to_square``
        (it comes from the model's ``image_aspect_ratio``, not from this file).
        """
        defaults = _processor_defaults(config)

        def setting(key: str):
            value = config.get(key)
            return defaults[key] if value is None else value

        resize_mode, size = _geometry(setting)
        normalize = setting("do_normalize")
        return cls(
            size=size,
            resize_mode=resize_mode,
            mean=setting("image_mean") if normalize else 0.0,
            std=setting("image_std") if normalize else 1.0,
            pad_to_square=pad,
            resample=setting("resample"),
            rescale_factor=setting("rescale_factor") if setting("do_rescale") else 1.0,
        )


_CLIP_DEFAULTS = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": Image.Resampling.BICUBIC,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
}
_SIGLIP_DEFAULTS = {**_CLIP_DEFAULTS, "size": {"height": 224, "width": 224}, "do_center_crop": False,
                    "crop_size": None, "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD}
_PROCESSOR_DEFAULTS = {"CLIPImageProcessor": _CLIP_DEFAULTS, "CLIPFeatureExtractor": _CLIP_DEFAULTS,
                       "SiglipImageProcessor": _SIGLIP_DEFAULTS}


def _processor_defaults(config: Mapping) -> dict:
    """The transformers class defaults for the processor type named in ``config``."""
    name = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
    defaults = _PROCESSOR_DEFAULTS.get(name.removesuffix("Fast").removesuffix("Pil"))
    if defaults is None:
        raise ConfigError(f"preprocessor_config has image_processor_type {name!r}; supported: "
                          f"{', '.join(_PROCESSOR_DEFAULTS)} (optionally ending in Fast or Pil)")
    return defaults


def _geometry(setting) -> tuple[ResizeMode, int]:
    """The resize mode and output side of an HF processor config whose output is one fixed square."""
    if not setting("do_resize"):
        raise ConfigError("preprocessor_config has do_resize false; edgelmm needs a fixed-size square input")
    kind, size = _parse_size(setting("size"), int_is_square=False, key="size")
    crop = None
    if setting("do_center_crop"):
        crop = _parse_size(setting("crop_size"), int_is_square=True, key="crop_size")
    if kind == "shortest_edge" and crop == ("square", size):
        return "shortest_edge_crop", size
    if kind == "square" and crop in (None, ("square", size)):
        return "square", size
    raise ConfigError(f"preprocessor_config resizes to {kind} {size} but crops to {crop}; only a centre crop "
                      "equal to the resize size (or no crop after a square resize) is supported")


def _parse_size(value, int_is_square: bool, key: str) -> tuple[str, int]:
    """Read an HF size field as ``("square", n)`` or ``("shortest_edge", n)``.

    An int means a square for ``crop_size`` and the shortest edge for ``size``, as transformers reads them
    (CLIP and SigLIP processors set ``default_to_square = False``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return ("square" if int_is_square else "shortest_edge", value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if isinstance(value, Mapping) and set(value) == {"shortest_edge"}:
        return "shortest_edge", value["shortest_edge"]
    if isinstance(value, Mapping) and set(value) == {"height", "width"} and value["height"] == value["width"]:
        return "square", value["height"]
    raise ConfigError(f"preprocessor_config {key} {value!r} is not supported; expected an int, "
                      "{'shortest_edge': n} or a square {'height': n, 'width': n}")


def _three_floats(field: str, values) -> tuple[float, float, float]:
    """Validate a per-channel parameter as three finite floats (one number is used for all three)."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,) * 3
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        floats = ()
    if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
        raise ConfigError(f"ImageSpec.{field} must be three finite numbers (R, G, B), got {values!r}")
    return floats


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Turn an image into the encoder input: float32 array of shape (3, spec.size, spec.size).

    Steps, as LLaVA + the HF PIL-backend processors: convert to RGB (``load_image`` rules), optional
    ``expand2square``, resize (``spec.resize_mode``, Pillow ``resize`` with ``spec.resample``), centre
    crop, ``pixels * rescale_factor`` computed in float64 then cast to float32, ``(x - mean) / std`` in
    float32.
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"preprocess expects a PIL.Image.Image, got {type(image).__name__}; "
                         "call load_image first")
    image = _pil_to_rgb(image, "image", None)
    padded = spec.pad_to_square and image.width != image.height
    pixels = np.asarray(_padded_resize(image, spec) if padded else _resize(image, spec))  # (size, size, 3) uint8
    scaled = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    normalized = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))  # (3, size, size)


def _padded_resize(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """LLaVA ``expand2square`` (the image centred, offsets floored, on a ``pad_fill`` square) then the resize,
    without holding the square canvas.

    Pillow resizes in two separable passes, rows first, rounding to uint8 in between. This runs the row pass
    on strips of the canvas rows that hold the image, and once on a single fill row for the rows that are all
    padding, then the column pass on the stacked result: the same arithmetic as resizing the whole canvas,
    in memory bounded by ``_PAD_STRIP_BYTES``. A square canvas resizes to size x size in both resize modes
    (its shortest edge is its side)."""
    width, height = image.size
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    fill_row = Image.new("RGB", (side, 1), spec.pad_fill).resize((spec.size, 1), resample=spec.resample)
    rows = np.empty((side, spec.size, 3), np.uint8)  # the row pass of the whole canvas
    rows[:top] = rows[top + height:] = np.asarray(fill_row)  # (1, size, 3) broadcast over the padding rows
    rows_per_strip = max(1, _PAD_STRIP_BYTES // (4 * side))  # Pillow stores RGB in 4 bytes a pixel
    for start in range(0, height, rows_per_strip):
        stop = min(start + rows_per_strip, height)
        strip = Image.new("RGB", (side, stop - start), spec.pad_fill)  # image rows [start, stop), padded
        strip.paste(image.crop((0, start, width, stop)), (left, 0))
        rows[top + start : top + stop] = np.asarray(strip.resize((spec.size, stop - start), resample=spec.resample))
    return Image.fromarray(rows).resize((spec.size, spec.size), resample=spec.resample)


def _resize(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize (and for ``shortest_edge_crop`` centre-crop) to spec.size x spec.size."""
    if spec.resize_mode == "square":
        return image.resize((spec.size, spec.size), resample=spec.resample)
    height, width = _shortest_edge_output_size(image.height, image.width, spec.size)
    resized = image.resize((width, height), resample=spec.resample)
    top, left = (height - spec.size) // 2, (width - spec.size) // 2
    return resized.crop((left, top, left + spec.size, top + spec.size))


def _shortest_edge_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shortest edge at ``size`` and the longest truncated, as transformers does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)
