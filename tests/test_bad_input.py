"""Hostile input (issue 22): images whose padding or resizing would multiply their pixels, bad paths, bad
command-line values and mutated image files all end in a typed edgelmm error, never a traceback or a
multi-gigabyte allocation."""
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from edgelmm.errors import ConfigError, EdgeLMMError, ImageError, ImageTooLargeError
from edgelmm.processing.image import ImageSpec, load_image, preprocess
from edgelmm.sampling import SamplingParams

# ---- the probe's files, built cheaply ----

def pillow_file(width: int, height: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB" if fmt != "GIF" else "P", (width, height)).save(buffer, fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tall_grey_png(height: int) -> bytes:
    """A valid 1 x ``height`` 8-bit greyscale PNG, its rows (filter byte 0, pixel 0) deflated in chunks."""
    compressor, rows = zlib.compressobj(9), bytes(2 * 1_000_000)
    idat = b"".join(compressor.compress(rows[: 2 * min(1_000_000, height - done)])
                    for done in range(0, height, 1_000_000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", 1, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(pillow_file(16, 16, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


PROBE = {  # name: (builder, its arguments)
    "1x4000 PNG": (pillow_file, (1, 4000, "PNG")),
    "1x20000 PNG": (pillow_file, (1, 20000, "PNG")),
    "1x65535 GIF": (pillow_file, (1, 65535, "GIF")),
    "35109x23 JPEG": (jpeg_claiming, (35109, 23)),
    "1x64,000,000 PNG": (tall_grey_png, (64_000_000,)),
}


def build(name: str) -> bytes:
    builder, arguments = PROBE[name]
    return builder(*arguments)


def test_probe_files_are_what_they_claim():
    for name, expected in [("1x4000 PNG", (1, 4000)), ("1x65535 GIF", (1, 65535)), ("35109x23 JPEG", (35109, 23))]:
        assert Image.open(io.BytesIO(build(name))).size == expected, name
    png = tall_grey_png(64_000_000)
    assert len(png) < 200_000 and Image.open(io.BytesIO(png)).size == (1, 64_000_000)
    small = Image.open(io.BytesIO(tall_grey_png(2_500_000)))  # the same builder decodes as a valid image
    small.load()
    assert small.size == (1, 2_500_000) and small.getextrema() == (0, 0)


MEASURE = textwrap.dedent("""
    import io, json, pathlib, resource, sys
    from PIL import Image
    from edgelmm.errors import ImageTooLargeError
    from edgelmm.processing.image import ImageSpec, load_image, preprocess

    files = {path.stem: path.read_bytes() for path in pathlib.Path(sys.argv[1]).iterdir()}
    outcomes = {}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    for name, encoded in files.items():
        for attempt in ("bytes", "opened image"):
            try:
                if attempt == "bytes":
                    load_image(encoded)
                else:  # an opened, not yet decoded PIL image handed to preprocess with LLaVA padding
                    preprocess(Image.open(io.BytesIO(encoded)), ImageSpec.clip(pad=True))
                outcomes[name + ", " + attempt] = "accepted"
            except ImageTooLargeError as exc:
                outcomes[name + ", " + attempt] = "refused: " + str(exc)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"outcomes": outcomes, "peak_growth_kib": growth}))
""")


def test_probe_files_are_refused_before_allocating(tmp_path):
    for index, name in enumerate(PROBE):
        (tmp_path / f"{index} {name}").write_bytes(build(name))
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["outcomes"]) == 2 * len(PROBE)
    for case, outcome in report["outcomes"].items():
        assert outcome.startswith("refused: ") and "aspect ratio" in outcome, (case, outcome)
    assert report["peak_growth_kib"] < 32 * 1024, report  # the probe saw 2.2 GB to 5 GB and more


PADDED_PEAK = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from edgelmm.processing.image import ImageSpec, load_image, preprocess

    height, width = int(sys.argv[1]), int(sys.argv[2])
    image = load_image(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    shape = preprocess(image, ImageSpec.clip(pad=True)).shape
    print(json.dumps({"shape": shape, "peak_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
""")


@pytest.mark.parametrize("height,width", [(400, 16000), (16000, 400)])
def test_padding_an_accepted_wide_image_never_holds_its_square(height, width):
    """A 1:40 image passes the limits; its expand2square canvas would take 16000^2 x 4 bytes = 977 MiB."""
    proc = subprocess.run([sys.executable, "-c", PADDED_PEAK, str(height), str(width)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["shape"] == [3, 336, 336]
    assert report["peak_growth_kib"] < 512 * 1024, report


def test_aspect_ratio_limit_is_inclusive():
    assert load_image(np.zeros((2, 100, 3), np.uint8)).size == (100, 2)  # exactly 1:50
    with pytest.raises(ImageTooLargeError, match="aspect ratio of 51:1"):
        load_image(np.zeros((2, 102, 3), np.uint8))
    with pytest.raises(ImageTooLargeError):
        preprocess(Image.new("RGB", (1, 51)), ImageSpec.siglip())


# ---- paths and arrays ----

@pytest.mark.parametrize("path", ["cat\0.png", "cat\ud800.png"])
def test_unusable_path_is_an_image_error(path):
    with pytest.raises(ImageError, match="not a valid file name"):
        load_image(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself warns
def test_np_matrix_is_read_as_its_array():
    matrix = np.matrix([[0, 128], [255, 7]], dtype=np.uint8)
    assert np.asarray(load_image(matrix)).tolist() == [[[v] * 3 for v in row] for row in [[0, 128], [255, 7]]]


# ---- sampling values ----

BAD_SAMPLING = [
    {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": -0.5}, {"temperature": "1"},
    {"top_k": float("nan")}, {"top_k": 2.5}, {"top_k": -1}, {"top_k": True},
    {"top_p": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": None},
    {"max_new_tokens": 0}, {"max_new_tokens": float("inf")}, {"max_new_tokens": "8"},
    {"seed": -1}, {"seed": 1.5}, {"seed": float("nan")},
    {"stop": 5}, {"stop": [""]}, {"stop_token_ids": [-3]}, {"stop_token_ids": 7},
]


@pytest.mark.parametrize("values", BAD_SAMPLING, ids=repr)
def test_bad_sampling_values_are_config_errors(values):
    with pytest.raises(ConfigError):
        SamplingParams(**values)


def test_good_sampling_values_are_kept():
    params = SamplingParams(max_new_tokens=np.int64(4), temperature=1, top_k=3, top_p=0.5, seed=np.uint32(7),
                            stop="###", stop_token_ids=[2])
    assert (params.max_new_tokens, params.temperature, params.seed, params.stop, params.stop_token_ids) == \
        (4, 1.0, 7, ("###",), (2,))
    assert np.random.default_rng(7).random() == params.rng().random()


# ---- the command line ----

def ask(model, *args, stdin: bytes | None = None):
    command = [sys.executable, "-m", "edgelmm.cli", "ask", str(model), "--max-new-tokens", "3", *args]
    return subprocess.run(command, check=False, capture_output=True, input=stdin, timeout=120)


def assert_one_line_error(proc, words: str) -> None:
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.startswith("edgelmm: error: "), stderr
    assert words in stderr, stderr


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("args,words", [
    (["--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number"),
    (["--prompt", "hi", "--temperature", "inf"], "temperature must be a finite number"),
    (["--prompt", "hi", "--top-p", "nan"], "top_p must be a finite number"),
    (["--prompt", "hi", "--seed", "-1"], "seed must be at least 0"),
    ([b"--prompt", b"caf\xff"], "not valid UTF-8"),
], ids=["temperature-nan", "temperature-inf", "top-p-nan", "seed-negative", "prompt-bytes"])
def test_bad_values_exit_2_with_one_line(tiny_checkpoint, image_file, args, words):
    assert_one_line_error(ask(tiny_checkpoint("mipha"), "--image", str(image_file), *args), words)


def test_cuda_without_gpu_exits_2(tiny_checkpoint, image_file):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = ask(tiny_checkpoint("mipha"), "--image", str(image_file), "--prompt", "hi", "--device", "cuda")
    assert_one_line_error(proc, "no CUDA GPU")


def test_fifo_image_exits_2_without_hanging(tiny_checkpoint, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    assert_one_line_error(ask(tiny_checkpoint("mipha"), "--image", str(tmp_path / "pipe"), "--prompt", "hi"),
                          "not a regular file")


def test_probe_image_exits_2(tiny_checkpoint, tmp_path):
    (tmp_path / "wide.png").write_bytes(pillow_file(1, 20000, "PNG"))
    assert_one_line_error(ask(tiny_checkpoint("llava-gemma"), "--image", str(tmp_path / "wide.png"), "--prompt",
                              "hi"), "aspect ratio")


@pytest.mark.parametrize("image", ["-", "/dev/stdin"])
def test_image_from_a_pipe(tiny_checkpoint, image_file, image):
    from edgelmm import EdgeLMM

    model = tiny_checkpoint("mipha")
    proc = ask(model, "--image", image, "--prompt", "What is it?", stdin=image_file.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == EdgeLMM.load(model).ask(image_file, "What is it?", max_new_tokens=3) + "\n"


def test_empty_pipe_exits_2(tiny_checkpoint):
    assert_one_line_error(ask(tiny_checkpoint("mipha"), "--image", "-", "--prompt", "hi", stdin=b""),
                          "standard input is empty (0 bytes)")


def test_endless_stream_is_cut_at_the_bound(monkeypatch):
    import edgelmm.processing.image as image_module

    monkeypatch.setattr(image_module, "MAX_STREAM_BYTES", 1000)
    assert image_module.read_stream(io.BytesIO(bytes(1000)), "pipe") == bytes(1000)
    with pytest.raises(ImageTooLargeError, match="pipe holds more than"):
        image_module.read_stream(io.BytesIO(bytes(1001)), "pipe")


# ---- mutated image files ----

def valid_files() -> list[bytes]:
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    files = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt)
        files.append(buffer.getvalue())
    return files


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip a few bytes, truncate, or duplicate a slice: the damage real transfers and editors do."""
    data = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:
        for position in rng.integers(0, len(data), rng.integers(1, 5)):
            data[position] = rng.integers(256)
    elif kind == 1:
        data = data[: rng.integers(0, len(data))]
    else:
        start = rng.integers(0, len(data))
        data[start:start] = data[start : start + rng.integers(1, 64)]
    return bytes(data)


def fuzz(cases: int, seed: int) -> None:
    rng, files, spec = np.random.default_rng(seed), valid_files(), ImageSpec.clip(pad=True)
    for case in range(cases):
        data = mutate(files[case % len(files)], rng)
        try:
            image = load_image(data, max_pixels=1_000_000)
        except EdgeLMMError:
            continue
        assert image.mode == "RGB"
        assert preprocess(image, spec).shape == (3, spec.size, spec.size)


def test_mutated_files_give_an_image_or_a_typed_error():
    fuzz(300, seed=0)


@pytest.mark.fuzz
def test_mutated_files_many():
    fuzz(20_000, seed=1)
