"""edgelmm.processing.image against transformers' PIL-backend SigLIP/CLIP processors, LLaVA's expand2square as
docs/model-formats.md §0.5 states it, and every bad input load_image must turn into a typed error."""

import contextlib
import io
import random
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from edgelmm.errors import ConfigError, ImageError, ImageTooLargeError
from edgelmm.processing.image import DEFAULT_MAX_PIXELS, ImageSpec, load_image, preprocess

ATOL = 1e-5
SIZES = [(1, 1), (7, 300), (333, 17), (640, 481), (481, 640)]  # (height, width)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- synthetic images ----

def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 7 % 256]
    return np.stack(channels, axis=-1).astype(np.uint8)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR (and its CRC) is patched to claim width x height."""
    data = bytearray(encoded(noise(1, 1), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ---- references ----

@pytest.fixture(scope="module")
def hf():
    """The slow PIL-backend processors; in transformers 5.x the plain names need torchvision."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    return {
        "siglip": SiglipImageProcessorPil(size={"height": 384, "width": 384}),
        "clip": CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    }


SPECS = {"siglip": ImageSpec.siglip(), "clip": ImageSpec.clip()}
PADDED_SPECS = {"siglip": ImageSpec.siglip(pad=True), "clip": ImageSpec.clip(pad=True)}


def hf_pixels(processor, image: Image.Image) -> np.ndarray:
    return processor(image, return_tensors="np")["pixel_values"][0]


def ref_expand2square(image: Image.Image, mean) -> Image.Image:
    """§0.5: centre the image on a square canvas filled with int(m * 255) per channel."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    side = max(height, width)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = [int(m * 255) for m in mean]
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = pixels
    return Image.fromarray(canvas)


def assert_matches(ours: np.ndarray, reference: np.ndarray, size: int) -> None:
    assert ours.shape == (3, size, size) and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert reference.shape == ours.shape
    assert np.abs(ours - reference).max() <= ATOL


# ---- preprocessing against transformers ----

@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("pattern", [noise, gradient])
def test_matches_hf_processor(hf, kind, height, width, pattern):
    image = Image.fromarray(pattern(height, width))
    assert_matches(preprocess(load_image(image), SPECS[kind]), hf_pixels(hf[kind], image), SPECS[kind].size)


def build_mode(mode: str) -> tuple[Image.Image, Image.Image]:
    """An image in ``mode`` and the RGB image the upstream pipeline hands to the processor."""
    height, width = 37, 50
    rgb = noise(height, width)
    if mode in ("RGB", "L", "CMYK", "F"):  # no alpha: the HF processor converts these itself
        image = {
            "RGB": lambda: Image.fromarray(rgb),
            "L": lambda: Image.fromarray(rgb[..., 0]),
            "CMYK": lambda: Image.frombytes("CMYK", (width, height), noise(height, width, 4).tobytes()),
            "F": lambda: Image.fromarray(rgb[..., 0].astype(np.float32) + 0.25),
        }[mode]()
        return image, image
    if mode == "P":
        image = Image.fromarray(rgb).quantize(64)
        return image, image
    if mode in ("RGBA", "LA", "P+transparency"):  # LLaVA: Image.open(f).convert("RGB") drops alpha
        image = Image.fromarray(noise(height, width, 4))
        if mode == "LA":
            image = image.convert("LA")
        if mode == "P+transparency":
            image = Image.fromarray(rgb).quantize(16)
            image.info["transparency"] = bytes(range(0, 256, 16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's palette-transparency notice
            return image, image.convert("RGB")
    wide = np.random.default_rng(1).integers(0, 65536, (height, width), dtype=np.uint16)
    image = Image.fromarray(wide if mode == "I;16" else wide.astype(np.int32))
    assert image.mode == mode
    return image, Image.fromarray((wide >> 8).astype(np.uint8))  # documented rule: keep the high byte


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "CMYK", "I;16", "I", "F"])
def test_modes_match_upstream_pipeline(hf, kind, mode):
    image, upstream = build_mode(mode)
    ours = preprocess(load_image(image), SPECS[kind])
    assert_matches(ours, hf_pixels(hf[kind], upstream), SPECS[kind].size)


def test_preprocess_converts_non_rgb_itself(hf):
    image, upstream = build_mode("I;16")
    assert_matches(preprocess(image, SPECS["siglip"]), hf_pixels(hf["siglip"], upstream), 384)


def test_alpha_is_dropped_not_composited():
    transparent_red = np.zeros((2, 2, 4), np.uint8)
    transparent_red[..., 0] = 255
    for source in (Image.fromarray(transparent_red), transparent_red, encoded(transparent_red, "PNG")):
        assert np.asarray(load_image(source)).tolist() == [[[255, 0, 0]] * 2] * 2


def test_palette_transparency_loads_without_pillow_warning():
    image = Image.fromarray(noise(4, 4)).quantize(16)
    image.info["transparency"] = bytes(range(0, 256, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(image).mode == "RGB"


def test_sixteen_bit_keeps_high_byte():
    values = np.array([[0, 255, 256, 1000, 32768, 65535]], np.uint16)
    expected = [0, 0, 1, 3, 128, 255]
    png = encoded(values, "PNG")
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    for source in (values, values.astype(">u2"), Image.fromarray(values), png):
        assert np.asarray(load_image(source))[0, :, 0].tolist() == expected
        assert np.asarray(load_image(source))[0, :, 2].tolist() == expected


@pytest.mark.parametrize(
    "array,expected",
    [
        (np.array([[7, 200]], np.uint8), [[[7, 7, 7], [200, 200, 200]]]),
        (np.array([[[7], [200]]], np.uint8), [[[7, 7, 7], [200, 200, 200]]]),
        (np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8), [[[1, 2, 3], [4, 5, 6]]]),
        (np.array([[[1, 2, 3, 0], [4, 5, 6, 9]]], np.uint8), [[[1, 2, 3], [4, 5, 6]]]),
        (np.array([[[256, 511, 65535]]], np.uint16), [[[1, 1, 255]]]),
        (np.array([[0.0, 0.5, 1.0, 0.002, 0.998]], np.float32), [[[v] * 3 for v in (0, 128, 255, 1, 254)]]),
        (np.array([[[0.0, 0.25, 1.0]]], np.float64), [[[0, 64, 255]]]),
        (np.array([[0.5]], np.float16), [[[128, 128, 128]]]),
    ],
)
def test_numpy_arrays(array, expected):
    image = load_image(array)
    assert image.mode == "RGB"
    assert np.asarray(image).tolist() == expected


# ---- LLaVA pad (expand2square) ----

def test_pad_fill_colours_from_the_doc():
    assert PADDED_SPECS["siglip"].pad_fill == (127, 127, 127)
    assert PADDED_SPECS["clip"].pad_fill == (122, 116, 104)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("height,width", [*SIZES, (2, 5), (5, 2)])
def test_pad_to_square_matches_llava(hf, kind, height, width):
    image = Image.fromarray(noise(height, width))
    spec = PADDED_SPECS[kind]
    reference = hf_pixels(hf[kind], ref_expand2square(image, spec.mean))
    assert_matches(preprocess(load_image(image), spec), reference, spec.size)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("height,width", [(40, 701), (701, 40), (3, 100)])
def test_pad_in_strips_matches_llava(hf, monkeypatch, kind, height, width):
    """The padded resize that builds the canvas in strips (here of 7 rows, the last one shorter) gives the
    pixels of transformers on the whole expand2square canvas."""
    import edgelmm.processing.image as image_module

    monkeypatch.setattr(image_module, "_PAD_STRIP_BYTES", 4 * max(height, width) * 7)
    image = Image.fromarray(noise(height, width, seed=3))
    spec = PADDED_SPECS[kind]
    reference = hf_pixels(hf[kind], ref_expand2square(image, spec.mean))
    assert_matches(preprocess(load_image(image), spec), reference, spec.size)


# ---- ImageSpec from preprocessor_config.json ----

SIGLIP_SO400M_CONFIG = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
OPENAI_CLIP_336_CONFIG = {  # the old feature-extractor layout with int sizes
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD), "resample": 3, "size": 336,
}
LLAVA_HF_CLIP_CONFIG = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD),
    "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def test_preprocessor_configs_give_the_presets():
    assert ImageSpec.from_preprocessor_config(SIGLIP_SO400M_CONFIG) == ImageSpec.siglip()
    assert ImageSpec.from_preprocessor_config(OPENAI_CLIP_336_CONFIG) == ImageSpec.clip()
    assert ImageSpec.from_preprocessor_config(LLAVA_HF_CLIP_CONFIG, pad=True) == ImageSpec.clip(pad=True)


@pytest.mark.parametrize(
    "config",
    [
        SIGLIP_SO400M_CONFIG,
        OPENAI_CLIP_336_CONFIG,
        {"image_processor_type": "CLIPImageProcessor"},  # class defaults: 224, centre crop
        {"image_processor_type": "SiglipImageProcessorFast", "size": {"height": 50, "width": 50},
         "resample": 2, "do_normalize": False},
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 40}, "crop_size": 40,
         "do_rescale": False, "image_mean": 0.3, "image_std": 0.2, "resample": 1},
    ],
)
def test_from_preprocessor_config_matches_hf(config):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    kind = config.get("image_processor_type") or config["feature_extractor_type"]
    processor_class = SiglipImageProcessorPil if kind.startswith("Siglip") else CLIPImageProcessorPil
    processor = processor_class.from_dict(dict(config))
    spec = ImageSpec.from_preprocessor_config(config)
    for height, width in [(333, 17), (64, 90)]:
        image = Image.fromarray(noise(height, width))
        assert_matches(preprocess(image, spec), hf_pixels(processor, image), spec.size)


@pytest.mark.parametrize(
    "config",
    [
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 256}, "crop_size": 224},
        {"image_processor_type": "CLIPImageProcessor", "do_center_crop": False},
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 512}},
        {"image_processor_type": "SiglipImageProcessor", "size": {"shortest_edge": 10, "longest_edge": 20}},
        {"image_processor_type": "SiglipImageProcessor", "do_resize": False},
        {"image_processor_type": "Siglip2ImageProcessor"},
        {"size": 384},
    ],
)
def test_from_preprocessor_config_rejects_what_it_cannot_reproduce(config):
    with pytest.raises(ConfigError, match="preprocessor_config"):
        ImageSpec.from_preprocessor_config(config)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0}, {"size": 384.0}, {"resize_mode": "crop"}, {"mean": (0.5, 0.5)}, {"std": (0.5, 0.0, 0.5)},
        {"mean": (0.5, float("nan"), 0.5)}, {"resample": 99}, {"rescale_factor": 0.0},
        {"mean": (0.0, 120.0, 0.0), "pad_to_square": True},
    ],
)
def test_image_spec_validates(kwargs):
    with pytest.raises(ConfigError, match=r"ImageSpec|pad_to_square"):
        ImageSpec(**{"size": 384, "resize_mode": "square", "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs})


# ---- bad input: typed errors with actionable messages ----

def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="not found") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_url_is_not_fetched():
    with pytest.raises(ImageError, match="download"):
        load_image("https://example.com/cat.jpg")


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path)


@pytest.mark.parametrize("as_file", [False, True])
def test_non_image_bytes(tmp_path, as_file):
    data = b"this is a text file, not a picture\n" * 20
    source = data
    if as_file:
        source = tmp_path / "notes.png"
        source.write_bytes(data)
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(source)
    assert not isinstance(info.value, ImageTooLargeError)


def test_empty_bytes_and_empty_file(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")


# Cut inside the pixel data, or (JPEG) just the end marker. A PNG missing only its IEND trailer still
# has every pixel, so nothing would be padded; it is not among the cases.
@pytest.mark.parametrize("fmt,keep", [("JPEG", 0.3), ("JPEG", 0.6), ("JPEG", 0.9), ("JPEG", -2),
                                      ("PNG", 0.3), ("PNG", 0.6), ("PNG", 0.9)])
def test_truncated_file_is_detected(tmp_path, fmt, keep):
    data = encoded(noise(64, 80), fmt)
    cut = data[:keep] if isinstance(keep, int) else data[: int(len(data) * keep)]
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    for source in (cut, path, Image.open(io.BytesIO(cut))):
        with pytest.raises(ImageError, match="truncated"):
            load_image(source)
    with pytest.raises(ImageError, match="truncated"):
        preprocess(Image.open(io.BytesIO(cut)), SPECS["siglip"])


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0), (0, 0, 1)])
def test_zero_size_array(shape):
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros(shape, np.uint8))


def test_zero_size_pil_image():
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="zero size"):
        preprocess(Image.new("L", (3, 0)), SPECS["clip"])


@pytest.mark.parametrize("shape", [(5,), (3, 5, 5), (5, 5, 2), (5, 5, 5), (1, 5, 5, 3)])
def test_wrong_array_shape(shape):
    with pytest.raises(ImageError, match=r"shape .*expected HxW"):
        load_image(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.bool_, np.complex64, np.uint32, object])
def test_wrong_array_dtype(dtype):
    with pytest.raises(ImageError, match=r"dtype .*expected uint8, uint16 or float"):
        load_image(np.zeros((4, 4, 3), dtype))


@pytest.mark.parametrize("bad", [255.0, -0.01, 1.0001, float("nan"), float("inf")])
def test_float_array_out_of_range(bad):
    array = np.full((4, 4, 3), 0.5, np.float32)
    array[1, 2, 0] = bad
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(array)


def test_mode_i_out_of_16_bit_range():
    with pytest.raises(ImageError, match="16-bit range"):
        load_image(Image.fromarray(np.array([[0, 70000]], np.int32)))


@pytest.mark.parametrize("source", [42, None, [[0, 255]], {"path": "x.png"}])
def test_unsupported_source_type(source):
    with pytest.raises(ImageError, match="cannot load an image from"):
        load_image(source)


def test_preprocess_needs_a_pil_image():
    with pytest.raises(ImageError, match="load_image first"):
        preprocess(noise(4, 4), SPECS["siglip"])


def test_oversized_header_default_limit(tmp_path):
    assert DEFAULT_MAX_PIXELS == 64_000_000
    data = png_claiming(9000, 8000)  # 72 MP: over ours, under Pillow's 89 MP warning threshold
    (tmp_path / "bomb.png").write_bytes(data)
    for source in (data, tmp_path / "bomb.png"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageTooLargeError) as info:
                load_image(source)
        message = str(info.value)
        assert "9000x8000" in message and "72,000,000" in message and "64,000,000" in message
        assert "max_pixels=72000000" in message


def test_oversized_header_beyond_pillows_own_limit():
    for max_pixels in (DEFAULT_MAX_PIXELS, None):
        with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS"):
            load_image(png_claiming(100_000, 100_000), max_pixels=max_pixels)


def test_max_pixels_argument():
    pixels = noise(80, 100)
    for source in (encoded(pixels, "PNG"), pixels, Image.fromarray(pixels)):
        with pytest.raises(ImageTooLargeError, match=r"100x80 = 8,000 pixels, over the limit of 7,999"):
            load_image(source, max_pixels=7999)
        assert load_image(source, max_pixels=8000).size == (100, 80)
        assert load_image(source, max_pixels=None).size == (100, 80)


@pytest.mark.parametrize("max_pixels", [0, -1, 1.5, True, "64M"])
def test_max_pixels_must_be_positive_int(max_pixels):
    with pytest.raises(ConfigError, match="max_pixels"):
        load_image(noise(2, 2), max_pixels=max_pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_damaged_files_only_raise_image_error(fmt):
    """Random byte damage: either an RGB image comes back or an ImageError; never a raw PIL/numpy error."""
    data = encoded(gradient(24, 31), fmt)
    rng = random.Random(fmt)
    for _ in range(40):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        damaged = damaged[: rng.randint(len(damaged) // 2, len(damaged))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(ImageError):
                assert load_image(bytes(damaged)).mode == "RGB"


def test_module_imports_and_runs_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import numpy as np\n"
        "from edgelmm.processing.image import ImageSpec, load_image, preprocess\n"
        "out = preprocess(load_image(np.zeros((5, 9, 3), np.uint8)), ImageSpec.clip())\n"
        "assert out.shape == (3, 336, 336)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
