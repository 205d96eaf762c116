"""Compile one recorded kernel launch for one GPU target, in a spawned process without the interpreter.

Used by test_compile.py's process pool: :func:`init` (the pool initializer) switches TRITON_INTERPRET off
before this process imports triton, because kernels decorated under the interpreter cannot be compiled.
Nothing here imports triton at module level, so importing it in the (interpreted) test process is harmless.
"""

import importlib
import os
import re
import subprocess
import tempfile


def init() -> None:
    os.environ["TRITON_INTERPRET"] = "0"


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """Registers and local memory per thread from ``cuobjdump -res-usage`` (what the driver reports)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output: {text}")
    regs, stack, static_shared, local = map(int, match.groups())
    # Triton's driver reports n_spills = CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4, i.e. LOCAL / 4.
    return {"regs": regs, "stack": stack, "static_shared": static_shared, "spills": local // 4}


def compile_launch(module: str, kernel: str, signature: dict, constexprs: dict, attrs: dict, options: dict,
                   arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not triton.knobs.runtime.interpret, "the compile worker must not run under TRITON_INTERPRET=1"
    fn = getattr(importlib.import_module(f"edgelmm.kernels.{module}"), kernel)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    return {"shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            **_resource_usage(compiled.asm["cubin"], triton.knobs.nvidia.cuobjdump.path)}
