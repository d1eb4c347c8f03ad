"""torch.library registration shared by the fused ops.

Each fused op's Triton-calling core is a ``torch.library`` custom op (``maxvit_fast::<name>``)
with a shape-only fake implementation and registered autograd, so ``torch.compile`` traces the
fused model without graph breaks. Host-side decisions (kernel-or-reference dispatch, argument
checks, drawing dropout seeds, module state) stay in the Python wrappers outside the ops.

A custom op is one opaque call for a ``TorchDispatchMode``: the aten ops and Triton launches
inside it are not seen. :func:`see_inside` registers, for a given mode class, a rule that runs the
op's Python implementation with the mode active, so tools that watch eager code (the traffic
counter in ``maxvit_fast.traffic``, the host-sync test) see everything the op does.
"""

from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "maxvit_fast"

# qualified name ("maxvit_fast::feedforward_residual") -> (custom op, its Python implementation)
registry: dict[str, tuple[object, Callable]] = {}
_transparent_modes: list[type] = []


def custom_op(name: str) -> Callable:
    """``torch.library.custom_op(f"maxvit_fast::{name}", mutates_args=())`` that also records
    the op and its implementation (for :func:`see_inside`)."""

    def register(fn: Callable):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        registry[f"{NAMESPACE}::{name}"] = (op, fn)
        for mode_class in _transparent_modes:
            _register_rule(op, fn, mode_class)
        return op

    return register


def _register_rule(op, fn, mode_class):
    def rule(mode, func, types, args, kwargs):
        with mode:  # the mode is off while its handler runs: switch it back on for the body
            return fn(*args, **(kwargs or {}))

    op.register_torch_dispatch(mode_class, rule)


def see_inside(mode_class: type) -> type:
    """Make every maxvit_fast custom op (present and future) run its Python implementation under
    ``mode_class`` (a TorchDispatchMode subclass) instead of appearing as one opaque call.
    Usable as a class decorator; returns ``mode_class``."""
    if mode_class not in _transparent_modes:
        _transparent_modes.append(mode_class)
        for op, fn in registry.values():
            _register_rule(op, fn, mode_class)
    return mode_class


def seed_tensor(seed, device) -> torch.Tensor:
    """A dropout seed (an int or a tensor) as the ops take it: a 1-element int64 tensor on the
    device of the op's inputs (the kernels read it there)."""
    return torch.as_tensor(seed, dtype=torch.int64).reshape(1).to(device)


def draw_seed(device) -> torch.Tensor:
    """A dropout seed drawn on ``device`` from torch's generator for that device
    (``torch.manual_seed`` makes fused dropout reproducible). Never read on the host: no
    ``.item()`` in traced code (no graph break, no device synchronisation), and inside a captured
    CUDA graph the draw is part of the graph, so every replay draws a fresh seed."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
