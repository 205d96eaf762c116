"""Robustness under bad input and concurrency, on tiny random-weight replicas: malformed and oversized
images, hostile prompts and sampling options, damaged checkpoints, and one model shared by 8 threads.

    python benchmarks/robustness.py [--cases 10000] [--seed 0] [--timeout 60] [--json out.json]

Each case ends as one of: ``typed`` (an ``edgelmm.errors`` error), ``ok`` (a valid result), ``wrong`` (a
result that should have been refused: a bad option accepted, a typed special token made real, a damaged
checkpoint of a must-refuse kind that answered, a threaded answer unlike its single-threaded one),
``crash`` (any other exception, or the worker process died), ``hang`` (no result within ``--timeout``) or
``over-memory`` (the case raised the process's peak RSS by more than 1 GB; every input here is under 1 MB).
Cases run in worker processes the parent restarts after a crash or hang; the peak is reset before each case
through /proc/self/clear_refs and read from VmHWM.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

OUTCOMES = ("typed", "ok", "wrong", "crash", "hang", "over-memory")
OVER_MEMORY = 1 << 30
SHARE = {"image": 0.75, "prompt": 0.13, "checkpoint": 0.04}  # the rest: concurrent calls
IMAGE_REPLICAS = ("tinyllava", "llava-gemma", "mipha", "tiny-llava-hf")
THREADS = 8


# --- memory -------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_growth(run) -> tuple[object, int]:
    """``run()``'s result and how far it raised this process's peak RSS above the RSS before it, in bytes."""
    _reset_peak()
    before = _status_kib("VmRSS")
    result = run()
    return result, (_status_kib("VmHWM") - before) * 1024


# --- the cases ----------------------------------------------------------------------------------------

def _png(width: int, height: int, rows: bytes, colour: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _long_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of black rows, compressed in pieces (a 1x64,000,000 one is ~250 KB)."""
    row, packer, out, left = b"\x00" + b"\x00" * 3 * width, zlib.compressobj(9), [], height
    block = row * max(1, (1 << 22) // len(row))
    while left > 0:
        n = min(left, len(block) // len(row))
        out.append(packer.compress(block[:n * len(row)]))
        left -= n
    return _png(width, height, b"".join(out) + packer.flush())


def _seed_images() -> list[bytes]:
    """Valid files of every format Pillow writes here, and the probe's tiny-file, huge-canvas ones."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8))
    files = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("WEBP", "RGB"), ("TIFF", "RGB"), ("PNG", "L")):
        buffer = io.BytesIO()
        picture.convert(mode).save(buffer, fmt)
        files.append(buffer.getvalue())
    files += [_long_png(1, 4000), _long_png(1, 20000), _long_png(4000, 1), _long_png(1, 1_000_000)]
    gif = bytearray(files[4])
    gif[6:10] = struct.pack("<HH", 1, 65535)  # a 35-byte-class GIF asking for 1x65535
    files.append(bytes(gif))
    return files


def _set_png_size(data: bytes, rng: random.Random) -> bytes:
    if not data.startswith(b"\x89PNG") or len(data) < 33:
        return data
    width, height = (rng.choice([0, 1, 2, 7, 4000, 65535, 2**20, 2**31 - 1, 2**32 - 1]) for _ in range(2))
    ihdr = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr[4:] + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _set_jpeg_size(data: bytes, rng: random.Random) -> bytes:
    at = data.find(b"\xff\xc0")
    if at < 0:
        return data
    height, width = rng.choice([0, 1, 23, 35109, 65535]), rng.choice([0, 1, 23, 35109, 65535])
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:  # flip bits
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del out[rng.randrange(len(out)):]
    elif kind == 2:  # overwrite a run with a byte that means much in headers
        at = rng.randrange(len(out))
        out[at:at + rng.randint(1, 6)] = bytes([rng.choice([0, 0xFF, 0x7F, 0x80])]) * rng.randint(1, 6)
    elif kind == 3:  # swap two bytes (the probe's JPEG size)
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    elif kind == 4:
        return _set_png_size(data, rng)
    elif kind == 5:
        return _set_jpeg_size(data, rng)
    else:  # insert junk
        at = rng.randrange(len(out) + 1)
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(out)


ODD_NUMBERS = [float("nan"), float("inf"), -float("inf"), -1, -0.5, 2**70, "1", None, True, [1]]


def _prompt_case(rng: random.Random, specials: list[str]) -> tuple[str, dict, bool]:
    """A prompt, sampling options, and whether an option is invalid (so a result is wrong)."""
    pieces = [rng.choice(specials) if specials else "", "\x00", "\ud800", "\u202e", "é" * 3, "🙂", "\n\n", "hello",
              "<image>", "ASSISTANT:", "<start_of_turn>model\n", "x" * rng.choice([1, 50, 5000])]
    prompt = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
    options, bad = {"max_new_tokens": rng.choice([1, 2, 3])}, False
    for name, good in (("temperature", [0, 0.7, 1.5]), ("top_k", [0, 1, 5]), ("top_p", [1.0, 0.5, 0.01]),
                       ("seed", [0, 7, None]), ("max_new_tokens", [1, 3])):
        if rng.random() < 0.25:
            value = rng.choice(ODD_NUMBERS)
            options[name] = value
            bad |= not (name == "seed" and value is None)
        elif rng.random() < 0.5:
            options[name] = rng.choice(good)
    return prompt, options, bad


# --- workers: each runs cases [start, stop) of one category, reporting on a pipe ----------------------

def _make_replicas(root: Path, names) -> dict:
    from edgelmm.synthetic.replicas import make_tiny

    return {name: make_tiny(name, root / name) for name in names}


def _image_worker(conn, start, stop, seed, root):
    from edgelmm import EdgeLMM
    from edgelmm.errors import EdgeLMMError

    models = [EdgeLMM.load(path, device="cpu") for path in _make_replicas(root, IMAGE_REPLICAS).values()]
    seeds = _seed_images()
    for i in range(start, stop):
        rng = random.Random(seed * 1_000_003 + i)
        data = rng.choice(seeds)
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            data = _mutate_bytes(data, rng)
        model = models[i % len(models)]
        size = model.spec.image.image_size
        conn.send(("start", i))

        def run():
            try:
                pixels = model.pixels(data)
            except EdgeLMMError:
                return "typed"
            import numpy as np
            good = pixels.shape == (1, 3, size, size) and bool(np.isfinite(pixels).all())
            return "ok" if good else "wrong"
        _report(conn, i, run)


def _prompt_worker(conn, start, stop, seed, root):
    from edgelmm import EdgeLMM
    from edgelmm.errors import EdgeLMMError

    models = [EdgeLMM.load(path, device="cpu") for path in _make_replicas(root, IMAGE_REPLICAS).values()]
    image = _seed_images()[0]
    for i in range(start, stop):
        rng = random.Random(seed * 1_000_003 + i)
        model = models[i % len(models)]
        specials = [t for t in model.tokenizer.special_tokens if t]
        prompt, options, bad = _prompt_case(rng, specials)
        conn.send(("start", i))

        def run():
            try:
                _, ids = model.prompt_ids(prompt)
                model.generate(image, prompt, **options)
            except EdgeLMMError:
                return "typed"
            _, honest = model.prompt_ids("hi")
            forged = _special_count(model, ids) != _special_count(model, honest)
            return "wrong" if bad or forged else "ok"
        _report(conn, i, run)


def _special_count(model, ids) -> int:
    special = model.tokenizer.special_token_ids
    return sum(i in special for i in ids)


def _damage(folder: Path, rng: random.Random) -> bool:
    """Damage the checkpoint ``folder`` in place; True for damage that must be refused (never answered)."""
    import numpy as np

    config = folder / "config.json"
    shards = sorted(folder.glob("*.safetensors"))
    kind = rng.randrange(6)
    if kind == 0:  # a config value of an odd type or size
        data = json.loads(config.read_text())
        section = data.get(rng.choice(["text_config", "vision_config"]), data)
        section = section if isinstance(section, dict) else data
        key = rng.choice(sorted(section))
        section[key] = rng.choice(ODD_NUMBERS + [0, {}, "text"])
        config.write_text(json.dumps(data))
        return False
    if kind == 1:  # a safetensors header entry changed
        raw = shards[0].read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice(ODD_NUMBERS + [[], [0, 10**12], "I64", [3, 3]])
        body = json.dumps(header).encode()
        shards[0].write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + length:])
        return True
    if kind == 2:  # bytes of a file cut or flipped
        path = rng.choice(shards + [config])
        raw = bytearray(path.read_bytes())
        if rng.random() < 0.5:
            del raw[rng.randrange(len(raw)):]
        else:
            raw[rng.randrange(min(len(raw), 4096))] ^= 0xFF
        path.write_bytes(bytes(raw))
        return False  # a flipped data byte is a valid (different) weight
    if kind == 3:  # NaN / inf weights
        from safetensors.numpy import load_file, save_file

        state = load_file(str(shards[0]))
        name = rng.choice(sorted(k for k, v in state.items() if v.dtype.kind == "f" and v.size > 1))
        state[name] = state[name].copy()
        state[name].flat[:] = rng.choice([np.nan, np.inf])
        save_file(state, str(shards[0]), metadata={"format": "pt"})
        return True
    if kind == 4:  # layers dropped by the config
        data = json.loads(config.read_text())
        text = data.get("text_config", data)
        if "num_hidden_layers" not in text or text["num_hidden_layers"] < 2:
            return False
        text["num_hidden_layers"] -= 1
        config.write_text(json.dumps(data))
        return True
    rng.choice(shards + [config]).unlink()  # a file missing
    return True


def _checkpoint_worker(conn, start, stop, seed, root):
    from edgelmm import EdgeLMM
    from edgelmm.errors import EdgeLMMError

    pristine = _make_replicas(root, IMAGE_REPLICAS)
    image = _seed_images()[0]
    for i in range(start, stop):
        rng = random.Random(seed * 1_000_003 + i)
        source = pristine[IMAGE_REPLICAS[i % len(IMAGE_REPLICAS)]]
        folder = root / f"case-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        must_refuse = _damage(folder, rng)
        conn.send(("start", i))

        def run():
            try:
                EdgeLMM.load(folder, device="cpu").ask(image, "What is it?", max_new_tokens=2)
            except EdgeLMMError:
                return "typed"
            return "wrong" if must_refuse else "ok"
        _report(conn, i, run)
        shutil.rmtree(folder, ignore_errors=True)


def _concurrency_worker(conn, start, stop, seed, root):
    """One model per backend shared by THREADS threads; every answer compared with its serial one."""
    import numpy as np

    from edgelmm import EdgeLMM
    from edgelmm.export.onnx_export import export_onnx

    source = _make_replicas(root, ["tinyllava"])["tinyllava"]
    backends = {"torch": EdgeLMM.load(source, device="cpu"),
                "onnx": EdgeLMM.load(export_onnx(source, root / "onnx", None, progress=False, vision_bits=16))}
    images = [np.random.default_rng(k).integers(0, 256, (40, 56, 3), dtype=np.uint8) for k in range(5)]
    prompts = ("What is in the picture?", "Describe the colours.", "Count the objects.", "Is it day or night?")

    def request(n):
        sampling = {"max_new_tokens": 6, "seed": seed + n} | ({"temperature": 0.9, "top_k": 20} if n % 2 else {})
        return images[n % 5], prompts[n % 4], sampling

    cases = list(range(start, stop))
    for name, model in backends.items():
        mine = cases[:len(cases) // 2] if name == "torch" else cases[len(cases) // 2:]
        serial = {n: model.generate(*request(n)[:2], **request(n)[2]).token_ids for n in mine}
        answers, lock = {}, threading.Lock()

        def work(chunk):
            for n in chunk:
                try:
                    tokens = model.generate(*request(n)[:2], **request(n)[2]).token_ids
                except Exception as e:  # noqa: BLE001 - counted as a crash of this case
                    tokens = e
                with lock:
                    answers[n] = tokens
        workers = [threading.Thread(target=work, args=(mine[t::THREADS],)) for t in range(THREADS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for n in mine:
            outcome = "crash" if isinstance(answers[n], Exception) else "ok" if answers[n] == serial[n] else "wrong"
            conn.send(("start", n))
            conn.send(("done", n, outcome, 0))


WORKERS = {"image": _image_worker, "prompt": _prompt_worker, "checkpoint": _checkpoint_worker,
           "concurrency": _concurrency_worker}


def _report(conn, i, run):
    try:
        outcome, growth = _peak_growth(run)
    except Exception:  # noqa: BLE001 - an untyped exception is the crash this benchmark counts
        outcome, growth = "crash", 0
    if growth > OVER_MEMORY:
        outcome = "over-memory"
    conn.send(("done", i, outcome, growth))


def _worker_main(category, conn, start, stop, seed):
    with tempfile.TemporaryDirectory(prefix="edgelmm-robustness-") as root:
        WORKERS[category](conn, start, stop, seed, Path(root))
    conn.close()


# --- the parent: runs the workers, restarting them past a crash or a hang -----------------------------

def run_category(category: str, count: int, seed: int, timeout: float, setup_timeout: float = 600) -> Counter:
    outcomes, start, context = Counter(), 0, mp.get_context("spawn")
    while start < count:
        parent, child = context.Pipe(duplex=False)
        worker = context.Process(target=_worker_main, args=(category, child, start, count, seed), daemon=True)
        worker.start()
        child.close()
        current, wait = None, setup_timeout
        while True:
            if not parent.poll(wait):
                outcomes["hang"] += 1
                worker.kill()
                break
            try:
                message = parent.recv()
            except EOFError:  # the worker died (a segfault, the OOM killer) or finished
                if current is not None:
                    outcomes["crash"] += 1
                break
            if message[0] == "start":
                current, wait = message[1], timeout
            else:
                outcomes[message[2]] += 1
                current, wait = None, setup_timeout
                start = message[1] + 1
        worker.join(5)
        if current is not None:
            start = current + 1
        elif start < count and not worker.is_alive() and worker.exitcode:
            raise RuntimeError(f"the {category} worker failed before its first case (exit {worker.exitcode})")
        print(f"  {category}: {sum(outcomes.values())}/{count} cases", file=sys.stderr, flush=True)
    return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60, help="seconds one case may take before it is a hang")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    counts = {name: math.floor(args.cases * share) for name, share in SHARE.items()}
    counts["concurrency"] = args.cases - sum(counts.values())
    table, t0 = {}, time.perf_counter()
    for category, count in counts.items():
        table[category] = run_category(category, count, args.seed, args.timeout)
    total = sum(table.values(), Counter())
    print(f"\n{'cases':<12} {'tried':>6} " + " ".join(f"{o:>11}" for o in OUTCOMES))
    for name, row in [*table.items(), ("total", total)]:
        print(f"{name:<12} {sum(row.values()):>6} " + " ".join(f"{row[o]:>11}" for o in OUTCOMES))
    print(f"\n{time.perf_counter() - t0:.0f} s; peak reset via clear_refs: {_reset_peak()}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "cases": {k: dict(v) for k, v in table.items()}}, indent=1))
    return 0 if all(total[o] == 0 for o in ("wrong", "crash", "hang", "over-memory")) else 1


if __name__ == "__main__":
    sys.exit(main())
