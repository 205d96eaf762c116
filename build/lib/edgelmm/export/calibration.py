"""Calibration data for GPTQ export: (image, prompt) pairs that are run through the model being quantized.

A calibration folder ``DIR`` holds images plus prompts, in one of two forms:

- ``DIR/calibration.jsonl``: one JSON object per line, ``{"image": "cats/1.jpg", "prompt": "What is this?"}``;
  ``image`` is relative to ``DIR`` (or absolute). Blank lines are skipped.
- ``DIR/prompts.txt``: one prompt per line (blank lines skipped), plus the image files found anywhere under
  ``DIR`` (``.jpg .jpeg .png .webp .bmp .gif``, sorted by path). Sample ``i`` pairs image ``i % #images``
  with prompt ``i % #prompts``; there are ``max(#images, #prompts)`` samples.

``--samples N`` keeps the first N samples. Without a folder, a built-in synthetic set is used (gradients,
shapes, noise, stripes, checkerboards and text-like glyph rows, with varied prompts), and a warning says that
real images and prompts from the target domain quantize better.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgelmm.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SYNTHETIC_WARNING = ("edgelmm export: no --calibration folder given; calibrating on built-in synthetic images and "
                     "prompts. Real images and prompts from your use case quantize better.")
PROMPTS = (
    "What is in the picture?", "Describe this image in detail.", "What colours do you see?",
    "Is there any text in the image? Read it out.", "How many shapes are there, and what are they?",
    "Where is the brightest part of the image?", "Write a short caption for this photo.",
    "What is unusual about this picture?", "Describe the pattern and its orientation.",
    "Answer briefly: is this image mostly dark or light?", "List the objects from left to right.",
    "What could this image be used for?", "Explain what is happening here step by step.",
    "Which colour covers the largest area?", "Is the image noisy or clean? Why?",
    "Compare the top half of the image with the bottom half.",
)


@dataclass
class Sample:
    """One calibration input: an RGB image and a user prompt (the template is applied by the exporter)."""

    image: Image.Image
    prompt: str


def load_calibration(folder: str | Path, limit: int) -> list[Sample]:
    """Read up to ``limit`` samples from a calibration folder (format in the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"calibration folder {folder} does not exist")
    if (folder / "calibration.jsonl").is_file():
        pairs = _jsonl_pairs(folder / "calibration.jsonl")
    elif (folder / "prompts.txt").is_file():
        pairs = _folder_pairs(folder)
    else:
        raise ConfigError(f"{folder} has neither calibration.jsonl nor prompts.txt; see `edgelmm export --help`")
    return [Sample(_open(path), prompt) for path, prompt in pairs[:limit]]


def _jsonl_pairs(path: Path) -> list[tuple[Path, str]]:
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((path.parent / row["image"], str(row["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} line {n}: expected {{\"image\": ..., \"prompt\": ...}} ({e})") from None
    if not pairs:
        raise ConfigError(f"{path} has no samples")
    return pairs


def _folder_pairs(folder: Path) -> list[tuple[Path, str]]:
    prompts = [p.strip() for p in (folder / "prompts.txt").read_text().splitlines() if p.strip()]
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not prompts or not images:
        raise ConfigError(f"{folder} needs at least one prompt in prompts.txt and one image "
                          f"({', '.join(IMAGE_SUFFIXES)})")
    n = max(len(images), len(prompts))
    return [(images[i % len(images)], prompts[i % len(prompts)]) for i in range(n)]


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ConfigError(f"calibration image {path} cannot be read ({e})") from None


def synthetic_image(i: int) -> Image.Image:
    """The ``i``-th built-in image: one of six kinds, with sizes, colours and layouts drawn from seed ``i``."""
    rng = random.Random(i)
    w, h = rng.choice([(384, 384), (320, 240), (240, 360), (500, 300)])
    kind = i % 6
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)  # [h, w] each
    if kind == 0:  # linear gradients in random directions per channel
        chans = [(np.cos(a) * x / w + np.sin(a) * y / h) for a in (rng.uniform(0, 6.3) for _ in range(3))]
        arr = np.stack(chans, -1)  # [h, w, 3]
        arr = (arr - arr.min()) / (np.ptp(arr) + 1e-6) * 255
    elif kind == 1:  # smooth colour noise upsampled from a coarse grid
        coarse = np.random.default_rng(i).uniform(0, 255, (rng.randint(3, 12), rng.randint(3, 12), 3))
        arr = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    elif kind == 2:  # white noise
        arr = np.random.default_rng(i).uniform(0, 255, (h, w, 3))
    elif kind == 3:  # stripes or checkerboard
        period = rng.randint(6, 48)
        cells = (x // period + (y // period if rng.random() < 0.5 else 0)) % 2  # [h, w]
        a, b = np.array(_colour(rng)), np.array(_colour(rng))
        arr = cells[..., None] * a + (1 - cells[..., None]) * b
    else:
        arr = None
    if arr is not None:
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    image = Image.new("RGB", (w, h), _colour(rng))
    draw = ImageDraw.Draw(image)
    if kind == 4:  # filled shapes
        for _ in range(rng.randint(2, 7)):
            box = sorted(rng.sample(range(w), 2)), sorted(rng.sample(range(h), 2))
            xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
            shape = rng.choice((draw.ellipse, draw.rectangle, draw.chord))
            kwargs = {"start": 0, "end": rng.randint(90, 300)} if shape == draw.chord else {}
            shape(xy, fill=_colour(rng), outline=_colour(rng), **kwargs)
    else:  # text-like rows of glyphs, as on a page or a sign
        for row in range(rng.randint(3, 10)):
            words = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in
                                     range(rng.randint(2, 9))) for _ in range(rng.randint(2, 8)))
            draw.text((rng.randint(0, w // 4), 10 + row * (h // 11)), words, fill=_colour(rng))
    return image


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)


def synthetic_calibration(n: int) -> list[Sample]:
    """``n`` built-in samples (deterministic): varied synthetic images paired with varied prompts."""
    return [Sample(synthetic_image(i), PROMPTS[(i * 7) % len(PROMPTS)]) for i in range(n)]


def calibration_samples(folder: str | Path | None, n: int) -> list[Sample]:
    """``n`` samples from ``folder``, or the built-in synthetic set (with a printed warning) when None."""
    if n < 1:
        raise ConfigError(f"--samples must be at least 1, got {n}")
    if folder is None:
        print(SYNTHETIC_WARNING, file=sys.stderr)
        return synthetic_calibration(n)
    return load_calibration(folder, n)
