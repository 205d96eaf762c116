"""The machine a benchmark runs on: device, CPU model and flags, threads, library versions, the Jetson power
mode and clock state, and a measured memory bandwidth. Standard library only, plus
torch or numpy for the bandwidth copy."""
from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "sve")
LIBRARIES = {"torch": "torch", "onnxruntime": "onnxruntime", "onnxruntime_genai": "onnxruntime-genai",
             "transformers": "transformers", "llama_cpp": "llama_cpp_python", "gguf": "gguf", "numpy": "numpy",
             "matplotlib": "matplotlib", "edgelmm": "edgelmm"}
# DRAM peak of Jetson modules (anchors.md §3.1), by /proc/device-tree/model substring, most specific first
JETSON_BANDWIDTH = (("Orin Nano", 68e9), ("Orin NX", 102.4e9), ("AGX Orin", 204.8e9), ("Thor", 273e9))


def cpu_info() -> dict:
    """CPU model name and which of CPU_FLAGS it has (from /proc/cpuinfo; platform fallbacks elsewhere)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    model = fields.get("model name") or fields.get("hardware") or platform.processor() or platform.machine()
    return {"model": model, "arch": platform.machine(), "flags": {f: f in flags for f in CPU_FLAGS},
            "amx": any(f.startswith("amx") for f in flags)}


def usable_cpus() -> int:
    """CPUs this process may run on (affinity), else the logical CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a benchmark may use (None: not installed)."""
    out = {}
    for name, dist in LIBRARIES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device_model() -> str:
    path = Path("/proc/device-tree/model")
    return path.read_bytes().decode(errors="replace").strip("\x00 \n") if path.is_file() else ""


def _pinned(folder: str, low: str, high: str) -> bool | None:
    try:
        return Path(folder, low).read_text().strip() == Path(folder, high).read_text().strip()
    except OSError:
        return None


def jetson_state() -> dict:
    """On a Jetson: the module, the nvpmodel power mode (``nvpmodel -q``) and whether jetson_clocks pinned
    the clocks (CPU and GPU minimum frequency = maximum); "n/a" elsewhere."""
    if not Path("/etc/nv_tegra_release").is_file() and "jetson" not in _device_model().lower():
        return {"is_jetson": False, "module": "n/a", "nvpmodel_mode": "n/a", "jetson_clocks": "n/a"}
    mode = "unknown (nvpmodel not found)"
    if shutil.which("nvpmodel"):
        try:
            out = subprocess.run(["nvpmodel", "-q"], check=False, capture_output=True, text=True, timeout=10).stdout
            mode = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Power Mode" in ln), out.strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            mode = f"unknown ({e})"
    folders = [("/sys/devices/system/cpu/cpu0/cpufreq", "scaling_min_freq", "scaling_max_freq")]
    folders += [(d, "min_freq", "max_freq") for d in glob.glob("/sys/class/devfreq/*gpu*")]
    pinned = [p for p in (_pinned(*f) for f in folders) if p is not None]
    clocks = "unknown" if not pinned else "on" if all(pinned) else "off"
    return {"is_jetson": True, "module": _device_model() or "unknown", "nvpmodel_mode": mode, "jetson_clocks": clocks}


def gpu_info() -> dict | None:
    """The CUDA device torch sees (name, memory, spec bandwidth when known), or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    spec = 2 * clock * 1e3 * bus / 8 if clock and bus else None  # DDR: two transfers per clock (kHz, bits)
    model = _device_model()
    for name, bandwidth in JETSON_BANDWIDTH:
        if name.lower() in model.lower():
            spec = bandwidth
            break
    return {"name": props.name, "total_memory_bytes": props.total_memory, "spec_bandwidth_bytes_per_s": spec}


def measure_bandwidth(size_bytes: int = 512 * 2**20, repeats: int = 5, threads: int | None = None) -> tuple[float, str]:
    """Host memory bandwidth in bytes/s: best of ``repeats`` copies of a ``size_bytes`` buffer, counting the
    read and the write (2 x size per copy). Multithreaded with torch when installed, else numpy."""
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        src = torch.ones(size_bytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        copy, method = (lambda: dst.copy_(src)), f"torch copy_, {torch.get_num_threads()} threads"
    except ImportError:
        import numpy as np

        src = np.ones(size_bytes // 4, np.float32)
        dst = np.empty_like(src)
        copy, method = (lambda: np.copyto(dst, src)), "numpy copyto, 1 thread"
    copy()  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - t)
    return 2 * size_bytes / best, f"{method}, {size_bytes / 2**20:.0f} MiB buffer, read+write bytes, best of {repeats}"


def ram_total_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info(threads: int, bandwidth_bytes: int, bandwidth_repeats: int = 5) -> dict:
    """Everything about the machine the report records (see edgelmm.bench.command for the schema)."""
    gpu = gpu_info()
    host_bw, method = measure_bandwidth(bandwidth_bytes, bandwidth_repeats, threads)
    bandwidth = host_bw
    if gpu and gpu["spec_bandwidth_bytes_per_s"]:
        bandwidth, method = gpu["spec_bandwidth_bytes_per_s"], "device specification (GPU)"
    return {"device": "cuda" if gpu else "cpu", "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_info(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "threads": threads,
            "ram_total_bytes": ram_total_bytes(), "gpu": gpu, "jetson": jetson_state(),
            "host_copy_bandwidth_bytes_per_s": host_bw, "memory_bandwidth_bytes_per_s": bandwidth,
            "memory_bandwidth_method": method, "libraries": library_versions()}
