"""Ahead-of-time compile of a Triton kernel for an NVIDIA architecture, on any machine.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` needs no GPU: it
returns PTX and a cubin. Triton's bundled ``cuobjdump`` then reports registers, stack and
LOCAL bytes (spills) and disassembles the SASS, so tests can check what the GPU compiler makes
of a kernel (no spills, tensor-core instructions in the matmuls) on a CPU-only machine.

The compile runs in a subprocess with the Triton interpreter switched off, because under
``TRITON_INTERPRET=1`` the ``@triton.jit`` objects are interpreter functions that cannot be
compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CompiledKernel:
    name: str
    arch: int
    registers: int
    stack: int
    local: int
    shared: int
    sass_opcodes: set = field(default_factory=set)
    ptx: str = ""

    def uses(self, prefix: str) -> bool:
        """Whether any SASS opcode starts with ``prefix`` (e.g. "HMMA", "HGMMA", "LDL")."""
        return any(op.startswith(prefix) for op in self.sass_opcodes)


_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
req = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(req["module"]), req["kernel"])
src = ASTSource(fn, req["signature"], req["constexprs"])
k = triton.compile(src, target=GPUTarget("cuda", req["arch"], 32), options=req["options"])
open(req["cubin"], "wb").write(k.asm["cubin"])
open(req["ptx"], "w").write(k.asm["ptx"])
"""


def cuobjdump_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_kernel(
    module: str,
    kernel: str,
    signature: dict,
    constexprs: dict | None = None,
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    timeout: float = 300,
) -> CompiledKernel:
    """Compile ``module.kernel`` for sm_``arch`` and report its resources.

    ``signature`` maps every argument name to a Triton type string ("*fp16", "i32", "fp32",
    "constexpr"); ``constexprs`` gives the constexpr values.
    """
    constexprs = dict(constexprs or {})
    with tempfile.TemporaryDirectory() as tmp:
        req = dict(
            module=module,
            kernel=kernel,
            signature=signature,
            constexprs=constexprs,
            arch=arch,
            options=dict(num_warps=num_warps, num_stages=num_stages),
            cubin=os.path.join(tmp, "k.cubin"),
            ptx=os.path.join(tmp, "k.ptx"),
        )
        env = dict(os.environ, TRITON_INTERPRET="0")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        proc = subprocess.run(
            [sys.executable, "-c", _SCRIPT, json.dumps(req)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {module}.{kernel} for sm_{arch} failed:\n{proc.stderr[-4000:]}")
        tool = str(cuobjdump_path())
        usage = subprocess.run([tool, "--dump-resource-usage", req["cubin"]], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", req["cubin"]], capture_output=True, text=True, check=True).stdout
        ptx = Path(req["ptx"]).read_text()

    def field_of(key):
        m = re.search(rf"\b{key}:(\d+)", usage)
        if m is None:
            raise RuntimeError(f"no {key} in cuobjdump's resource report:\n{usage}")
        return int(m.group(1))

    # SASS lines look like "/*0120*/   @P0 HMMA.16816.F32 R4, R8, ... ;": take the opcode.
    opcodes = set()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            opcodes.add(m.group(1))
    return CompiledKernel(
        name=kernel, arch=arch, registers=field_of("REG"), stack=field_of("STACK"),
        local=field_of("LOCAL"), shared=field_of("SHARED"), sass_opcodes=opcodes, ptx=ptx,
    )
