"""Ahead-of-time compilation of every kernel configuration the runtime launches, for sm_80, sm_86, sm_87
(Jetson Orin) and sm_89, without a GPU.

The launches are recorded by calling each ``*_triton`` wrapper on meta tensors with the kernel replaced by
a recorder, for representative model shapes that together hit every ``LAUNCH_CONFIGS`` entry and constexpr
flag (asserted below). Each launch is specialized the way Triton's JIT would (int == 1 and 16-divisibility,
16-byte pointer alignment) and compiled with ``triton.compile(ASTSource(...), target=GPUTarget(...))`` in a
process pool. Checks: dynamic shared memory within the target's per-block limit; no register spills for the
decode kernels (other kernels' spills are reported).
"""

import importlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

triton = pytest.importorskip("triton")
import kernel_compile_worker
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376}  # bytes of shared memory per block (opt-in max)
NO_SPILL_KERNELS = {"_decode_attention_stage1_kernel", "_decode_attention_stage2_kernel"}
META = "meta"
F16, F32 = torch.float16, torch.float32


def _t(*shape, dtype=F16):
    return torch.empty(*shape, dtype=dtype, device=META)


def _prefill_launches(m):
    for dtype in (F16, F32):
        for head_dim in (64, 80, 256):  # BLOCK_D 64, 128, 256
            for causal in (False, True):
                q = _t(1, 32, 1024, head_dim, dtype=dtype)
                k = _t(1, 8, 1024, head_dim, dtype=dtype)
                m.prefill_attention_triton(q, k, k, torch.empty_like(q), 0.1, causal)


def _decode_launches(m):
    for dtype in (F16, F32):
        for kv_int8 in (False, True):
            for head_dim in (64, 80, 256):
                q = _t(1, 32, head_dim, dtype=dtype)
                cache = _t(1, 8, 4096, head_dim, dtype=torch.int8 if kv_int8 else dtype)
                scale = _t(1, 8, 4096) if kv_int8 else None
                m.decode_attention_triton(q, cache, cache, _t(1, dtype=torch.int32), torch.empty_like(q), 0.1,
                                          k_scale=scale, v_scale=scale,
                                          part_out=_t(1, 32, 16, head_dim, dtype=F32),
                                          part_lse=_t(1, 32, 16, dtype=F32))


def _gptq_launches(m):
    k = n = 2560
    for dtype in (F16, F32):
        for rows in (1, 64):
            for bits in (4, 8):
                for g_idx in (None, _t(k, dtype=torch.int32)):
                    for bias in (None, _t(n)):
                        qweight = _t(k * bits // 32, n, dtype=torch.int32)
                        qzeros = _t(k // 128, n * bits // 32, dtype=torch.int32)
                        m.gptq_matmul_triton(_t(rows, k, dtype=dtype), qweight, qzeros, _t(k // 128, n),
                                             g_idx, bias, _t(rows, n, dtype=dtype), bits=bits, group_size=128,
                                             zero_v1=True)


def _norm_launches(m):
    for dtype in (F16, F32):
        for hidden in (1024, 2048, 2560, 8192):  # BLOCK_N 1024, 2048, 4096, 8192
            x, w = _t(16, hidden, dtype=dtype), _t(hidden, dtype=dtype)
            for residual in (None, _t(16, hidden, dtype=dtype)):
                kw = {"residual": residual, "residual_out": residual}
                m.rms_norm_triton(x, w, torch.empty_like(x), 1e-6, **kw)
                m.layer_norm_triton(x, w, w, torch.empty_like(x), 1e-6, **kw)


def _rotary_launches(m):
    for dtype in (F16, F32):
        for head_dim, rotary_dim in ((64, 64), (80, 32), (256, 256)):  # BLOCK_D 64, 128, 256
            x = _t(1, 32, 512, head_dim, dtype=dtype)
            m.rotary_triton(x, _t(1, 512, rotary_dim, dtype=F32), _t(1, 512, rotary_dim, dtype=F32),
                            _t(1, 32, 512, head_dim, dtype=dtype), rotary_dim)


# module -> (launch generator, kernel names, key of a recorded launch in LAUNCH_CONFIGS (None = not keyed))
MODULES = {
    "prefill_attention": (_prefill_launches, ["_prefill_attention_kernel"],
                          lambda a, kw: (a["q_ptr"].dtype, kw["BLOCK_D"])),
    "decode_attention": (_decode_launches, sorted(NO_SPILL_KERNELS),
                         lambda a, kw: (a["q_ptr"].dtype, kw["KV_INT8"], kw["BLOCK_D"]) if "KV_INT8" in kw
                         else None),  # stage 2 is keyed by its stage-1 launch
    "gptq_matmul": (_gptq_launches, ["_gptq_matmul_kernel"],
                    lambda a, kw: (kw["IS_GEMV"], kw["BITS"], kw["HAS_G_IDX"], a["x_ptr"].dtype)),
    "norms": (_norm_launches, ["_norm_kernel"], lambda a, kw: (a["x_ptr"].dtype, kw["BLOCK_N"])),
    "rotary": (_rotary_launches, ["_rotary_kernel"], lambda a, kw: (a["x_ptr"].dtype, kw["BLOCK_D"])),
}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.kernel, args, kwargs))


def _specialize(kernel, args, kwargs):
    """Signature, constexprs and attrs as Triton's JIT derives them for these arguments."""
    fn = kernel.fn  # the python function under the interpreter's wrapper
    names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    no_spec = set(kernel.kwargs.get("do_not_specialize") or ())
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages", 3)}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(names, args)):
        kind, spec = native_specialize_impl(BaseBackend, arg, False, name not in no_spec, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in kwargs.items():
        signature[name], constexprs[name] = "constexpr", value
    return signature, constexprs, attrs, options


def _record_all():
    launches, missing = [], []
    with pytest.MonkeyPatch.context() as mp:
        for module_name, (generate, kernel_names, key_of) in MODULES.items():
            module = importlib.import_module(f"edgelmm.kernels.{module_name}")
            recorded = []
            for kernel_name in kernel_names:
                mp.setattr(module, kernel_name, _Recorder(getattr(module, kernel_name), recorded))
            generate(module)
            keys = set()
            for kernel, args, kwargs in recorded:
                arg_names = kernel.fn.__code__.co_varnames[: len(args)]
                key = key_of(dict(zip(arg_names, args)), kwargs)
                keys.add(key)
                launches.append((module_name, kernel.fn.__name__, *_specialize(kernel, args, dict(kwargs))))
            missing += [(module_name, k) for k in set(module.LAUNCH_CONFIGS) - keys]
    return launches, missing


@pytest.fixture(scope="module")
def recorded_launches():
    launches, missing = _record_all()
    assert not missing, f"LAUNCH_CONFIGS entries not exercised by the compile test: {missing}"
    unique = {repr(launch): launch for launch in launches}  # the same variant recorded twice compiles once
    return list(unique.values())


@pytest.fixture(scope="module")
def pool():
    context = multiprocessing.get_context("spawn")
    workers = os.cpu_count() or 1
    with ProcessPoolExecutor(workers, mp_context=context, initializer=kernel_compile_worker.init) as ex:
        yield ex


@pytest.mark.parametrize("arch", sorted(SMEM_LIMIT))
def test_compile_all_launch_configs(arch, recorded_launches, pool):
    futures = [(launch, pool.submit(kernel_compile_worker.compile_launch, *launch, arch))
               for launch in recorded_launches]
    problems, rows = [], []
    for (module, kernel, signature, constexprs, _, options), future in futures:
        res = future.result()
        dtype = next(kind for kind in signature.values() if kind.startswith("*"))[1:]  # first pointer's dtype
        flags = ",".join([dtype] + [f"{k}={v}" for k, v in constexprs.items() if k.isupper()])
        rows.append(f"sm_{arch} {kernel:32s} {flags:76s} warps={options['num_warps']} "
                    f"stages={options['num_stages']} smem={res['shared']:6d} regs={res['regs']:3d} "
                    f"spills={res['spills']}")
        if res["shared"] + res["static_shared"] > SMEM_LIMIT[arch]:
            problems.append(f"{rows[-1]}: shared memory over the {SMEM_LIMIT[arch]} B limit")
        if kernel in NO_SPILL_KERNELS and res["spills"]:
            problems.append(f"{rows[-1]}: register spills in a decode kernel")
    print("\n" + "\n".join(rows))
    assert not problems, "\n".join(problems)
