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
    request: dict = field(default_factory=dict)

    def uses(self, prefix: str) -> bool:
        """Whether any SASS opcode is ``prefix`` or ``prefix.<modifiers>`` ("HMMA" matches
        "HMMA.16816.F32", "LDG.E.128" matches "LDG.E.128.CONSTANT")."""
        return any(op == prefix or op.startswith(prefix + ".") for op in self.sass_opcodes)

    @property
    def spills(self) -> bool:
        """Register spills: LOCAL or STACK bytes, or local-memory loads/stores in the SASS."""
        return self.local > 0 or self.stack > 0 or self.uses("LDL") or self.uses("STL")

    def summary(self) -> str:
        return (f"sm_{self.arch} {self.name}: REG {self.registers} STACK {self.stack} LOCAL {self.local} "
                f"SHARED {self.shared}{' HMMA' if self.uses('HMMA') else ''}{' HGMMA' if self.uses('HGMMA') else ''}")


# One process compiles a list of kernels (one Triton start-up per shard). Pointer arguments and
# the integers named in "divisible" get the divisibility-by-16 hint that Triton's runtime
# specialisation gives aligned pointers and multiple-of-16 integers at a real launch; without it
# the compiler cannot vectorise and the report would not describe the launched kernel.
_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
reqs, out_dir = json.load(open(sys.argv[1])), sys.argv[2]
for i, req in enumerate(reqs):
    fn = getattr(importlib.import_module(req["module"]), req["kernel"])
    constexprs = req.get("constexprs") or {}
    sig = dict(req["signature"], **{name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in sig.items() if t.startswith("*") or n in req.get("divisible", ())}
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs),
                       target=GPUTarget("cuda", req["arch"], 32),
                       options=dict(num_warps=req.get("num_warps", 4), num_stages=req.get("num_stages", 3)))
    open(f"{out_dir}/{i}.cubin", "wb").write(k.asm["cubin"])
"""


def cuobjdump_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _read_cubin(cubin: str, req: dict) -> CompiledKernel:
    tool = str(cuobjdump_path())
    usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout

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
        name=req["kernel"], arch=req["arch"], registers=field_of("REG"), stack=field_of("STACK"),
        local=field_of("LOCAL"), shared=field_of("SHARED"), sass_opcodes=opcodes, request=req,
    )


def compile_kernels(requests: list[dict], shards: int = 2, timeout: float = 900) -> list[CompiledKernel]:
    """Compile many kernels, ``shards`` processes in parallel, and report each one's resources.

    A request is a dict: ``module`` and ``kernel`` (importable names), ``signature`` (every
    argument name -> Triton type string: "*fp16", "i32", "fp32", "constexpr"), ``constexprs``,
    ``arch`` (80, 90, ...; constexprs need not be repeated in the signature), and optionally ``num_warps``, ``num_stages`` and ``divisible`` (integer
    arguments known to be multiples of 16 at launch, e.g. strides of channels-last maps).
    """
    shards = max(1, min(shards, len(requests)))
    with tempfile.TemporaryDirectory() as tmp:
        parts = [requests[i::shards] for i in range(shards)]
        env = dict(os.environ, TRITON_INTERPRET="0")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        procs = []
        for s, part in enumerate(parts):
            Path(tmp, str(s)).mkdir()
            Path(tmp, f"{s}.json").write_text(json.dumps(part))
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _SCRIPT, str(Path(tmp, f"{s}.json")), str(Path(tmp, str(s)))],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"ahead-of-time compile failed:\n{err[-4000:]}")
        by_request = {}
        for s, part in enumerate(parts):
            for i, req in enumerate(part):
                by_request[id(req)] = _read_cubin(str(Path(tmp, str(s), f"{i}.cubin")), req)
    return [by_request[id(r)] for r in requests]


def compile_kernel(module: str, kernel: str, signature: dict, constexprs: dict | None = None,
                   arch: int = 90, num_warps: int = 4, num_stages: int = 3,
                   divisible: tuple = ()) -> CompiledKernel:
    """Compile one kernel (see :func:`compile_kernels`)."""
    req = dict(module=module, kernel=kernel, signature=signature, constexprs=dict(constexprs or {}),
               arch=arch, num_warps=num_warps, num_stages=num_stages, divisible=list(divisible))
    return compile_kernels([req], shards=1)[0]
