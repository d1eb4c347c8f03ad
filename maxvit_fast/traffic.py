"""Memory-traffic model: activation bytes materialised and kernel launches per forward.

``TrafficCounter`` watches a piece of eager code through two hooks:

* a ``TorchDispatchMode`` sees every aten op below autograd. Views (and ops whose outputs alias
  their inputs) write nothing and launch nothing. Pure allocations (``empty``, ``empty_like``,
  ...) launch nothing; their bytes are charged to whoever writes the buffer first. Every other
  op counts as one kernel launch that writes the bytes of its outputs (in-place and ``out=`` ops:
  the tensors they write).
* Triton launches are seen by wrapping ``run`` of ``triton.runtime.jit.JITFunction`` (compiled
  kernels) and of ``triton.runtime.interpreter.InterpretedFunction`` (``TRITON_INTERPRET=1``):
  every ``kernel[grid](...)`` call goes through it in every Triton 3.x release (the launch-hook
  knobs differ between releases, this entry point does not). A launch counts once and is charged
  the bytes of the freshly allocated buffers passed to it (the kernel's outputs). Aten ops run
  by the Triton interpreter itself inside a launch are not counted.

The model is of a GPU: one aten op = one launch (cuBLAS/cuDNN sometimes launch two or three
kernels for one op, and a few ops launch none), bytes = bytes the op writes to memory. It is
exact for the toy modules in tests/test_bench.py and for any Triton kernel that writes whole
freshly allocated outputs; a kernel writing into a pre-existing tensor in place is counted as a
launch with no bytes.

``execute_triton=False`` (a "dry run") records Triton launches without executing them: the
counts are the same (eager code does not branch on kernel outputs in inference), the outputs are
garbage. That is how the fused path is counted on a CPU, where the interpreter would take many
minutes for one 224x224 image.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .ops.library import see_inside

__all__ = ["TrafficCounter", "TrafficReport", "OpCount", "count_traffic", "triton_launches"]

# Ops that only allocate memory: nothing written, nothing launched.
_ALLOCATIONS = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::empty_permuted",
}
# Host reads of a device value (``.item()``): a synchronisation and a tiny copy, not a kernel.
_HOST_SYNCS = {"aten::_local_scalar_dense"}


def _storage_key(t: torch.Tensor):
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, subclasses)
        return None
    return (t.device.type, t.device.index, ptr) if ptr else None


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------------
# Triton launch interception
# ------------------------------------------------------------------------------------------------

_listeners: list = []  # objects with .on_triton_launch(name, args, kwargs) and .execute_triton
_originals: dict = {}


def _kernel_classes():
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    except ImportError:
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", None)
    return getattr(fn, "__name__", None) or getattr(kernel, "__name__", None) or type(kernel).__name__


def _make_run(original):
    def run(self, *args, **kwargs):
        if kwargs.get("warmup", False) or not _listeners:
            return original(self, *args, **kwargs)
        name = _kernel_name(self)
        listeners = list(_listeners)
        for listener in listeners:
            listener.on_triton_launch(name, args, kwargs)
        if not all(listener.execute_triton for listener in listeners):
            return None
        for listener in listeners:
            listener.inside_triton += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            for listener in listeners:
                listener.inside_triton -= 1

    run._maxvit_fast_traffic = True
    return run


def _install():
    for cls in _kernel_classes():
        if cls not in _originals:
            # (own attribute or None, the method to wrap): run may be inherited in some release
            _originals[cls] = (cls.__dict__.get("run"), cls.run)
            cls.run = _make_run(_originals[cls][1])


def _uninstall():
    for cls, (own, _) in _originals.items():
        if own is None:
            del cls.run
        else:
            cls.run = own
    _originals.clear()


@contextlib.contextmanager
def _listening(listener):
    _listeners.append(listener)
    _install()
    try:
        yield listener
    finally:
        _listeners.remove(listener)
        if not _listeners:
            _uninstall()


class _LaunchTally:
    """Counts Triton launches by kernel name (see :func:`triton_launches`)."""

    def __init__(self):
        self.counts: dict[str, int] = defaultdict(int)
        self.execute_triton = True
        self.inside_triton = 0

    def on_triton_launch(self, name, args, kwargs):
        self.counts[name] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def triton_launches():
    """``with triton_launches() as tally:`` counts Triton kernel launches (``tally.total``,
    ``tally.counts`` by kernel name), at almost no cost: no dispatch mode."""
    with _listening(_LaunchTally()) as tally:
        yield tally


# ------------------------------------------------------------------------------------------------
# The counter
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpCount:
    section: str
    op: str  # "aten::addmm", "triton:_pointwise_conv_kernel", ...
    calls: int = 0
    launches: int = 0
    bytes: int = 0


@dataclasses.dataclass
class TrafficReport:
    ops: list[OpCount]
    host_syncs: int
    unwritten_allocation_bytes: int

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.ops)

    @property
    def launches(self) -> int:
        return sum(o.launches for o in self.ops)

    @property
    def triton_launches(self) -> int:
        return sum(o.launches for o in self.ops if o.op.startswith("triton:"))

    def by_op(self) -> list[OpCount]:
        """Merged over sections, most bytes first."""
        merged: dict[str, OpCount] = {}
        for o in self.ops:
            m = merged.setdefault(o.op, OpCount("*", o.op))
            m.calls += o.calls
            m.launches += o.launches
            m.bytes += o.bytes
        return sorted(merged.values(), key=lambda o: (-o.bytes, -o.launches, o.op))

    def by_section(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for o in self.ops:
            s = out.setdefault(o.section, {"bytes": 0, "launches": 0})
            s["bytes"] += o.bytes
            s["launches"] += o.launches
        return out

    def to_dict(self, per: int = 1) -> dict:
        """JSON-ready summary; bytes are divided by ``per`` (e.g. the batch size)."""
        return {
            "bytes": self.bytes / per,
            "launches": self.launches,
            "triton_launches": self.triton_launches,
            "host_syncs": self.host_syncs,
            "unwritten_allocation_bytes": self.unwritten_allocation_bytes / per,
            "by_section": {k: {"bytes": v["bytes"] / per, "launches": v["launches"]}
                           for k, v in self.by_section().items()},
            "by_op": [{"op": o.op, "calls": o.calls, "launches": o.launches, "bytes": o.bytes / per}
                      for o in self.by_op()],
        }


# see_inside: the counter looks inside maxvit_fast's custom ops (their aten ops, allocations and
# Triton launches are what it counts), instead of seeing each as one opaque call.
@see_inside
class _DispatchMode(TorchDispatchMode):
    def __init__(self, counter: "TrafficCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.counter.inside_triton:
            self.counter._on_aten(func, args, kwargs, out)
        return out


class TrafficCounter:
    """``with TrafficCounter() as counter: model(x)`` then ``counter.report()``.

    ``with counter.section("mbconv"):`` labels what runs inside it (sections do not nest; the
    innermost wins). Not thread-safe; eager code only (not inside torch.compile or CUDA graphs).
    """

    def __init__(self, execute_triton: bool = True):
        self.execute_triton = execute_triton
        self.inside_triton = 0
        self._section = "other"
        self._counts: dict[tuple[str, str], OpCount] = {}
        self._pending: dict[tuple, int] = {}  # storage key -> bytes of a not-yet-written allocation
        self._unwritten = 0
        self._host_syncs = 0
        self._stack: contextlib.ExitStack | None = None

    # -- context management ----------------------------------------------------------------------
    def __enter__(self):
        stack = contextlib.ExitStack()
        stack.enter_context(_listening(self))
        stack.enter_context(_DispatchMode(self))
        self._stack = stack
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc)

    @contextlib.contextmanager
    def section(self, name: str):
        previous, self._section = self._section, name
        try:
            yield
        finally:
            self._section = previous

    def label_backward(self, tree, name: str):
        """``tree`` with its grad-requiring tensors passed through an identity whose backward
        makes ``name`` the current section: put on a piece of code's outputs (with ``name``)
        and on its inputs (with the section of what runs around it), the backward of that code
        is counted under ``name``. Autograd runs a node once all gradients flowing into it are
        summed, so for code that is a chain of steps (a model's blocks) each step's backward
        runs between its outputs' identity and its inputs'. Views only: nothing is written."""
        if not torch.is_grad_enabled():
            return tree
        flat, spec = tree_flatten(tree)
        slots = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        if slots:
            labelled = _BackwardLabel.apply(self, name, *(flat[i] for i in slots))
            for i, t in zip(slots, labelled):
                flat[i] = t
        return tree_unflatten(flat, spec)

    # -- recording -------------------------------------------------------------------------------
    def _record(self, op: str, launches: int, nbytes: int):
        key = (self._section, op)
        entry = self._counts.get(key)
        if entry is None:
            entry = self._counts[key] = OpCount(self._section, op)
        entry.calls += 1
        entry.launches += launches
        entry.bytes += nbytes

    def _forget_pending(self, key):
        """An allocation at ``key`` is superseded (its memory was reused): it was never written."""
        stale = self._pending.pop(key, None)
        if stale is not None:
            self._unwritten += stale

    def _on_aten(self, func, args, kwargs, out):
        name, base = func.name(), func._schema.name  # "aten::sum.dim_IntList", "aten::sum"
        if base in _HOST_SYNCS:
            self._host_syncs += 1
            return
        outputs = _tensors(out)
        if base in _ALLOCATIONS:
            for t in outputs:
                key = _storage_key(t)
                if key is not None:
                    self._forget_pending(key)
                    self._pending[key] = t.untyped_storage().nbytes()
            return
        schema = func._schema
        mutates = schema.is_mutable or any(
            r.alias_info is not None and r.alias_info.is_write for r in schema.returns
        )
        if func.is_view or not mutates:
            # A view, or an op that returns (a view of) its input (_unsafe_view, lift_fresh), writes
            # nothing. Ops whose schema only says the result MAY alias the input (contiguous,
            # to, reshape: seen as such inside custom ops, where composite ops are not yet
            # decomposed) count as copies when the result is new memory.
            inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
            if not outputs or all(_storage_key(t) in inputs for t in outputs):
                return
        written = 0
        for t in outputs:
            key = _storage_key(t)
            if mutates:
                self._pending.pop(key, None)  # the op writes that allocation: charged here
            else:
                self._forget_pending(key)
            written += _nbytes(t)
        self._record(name, 1, written)

    def on_triton_launch(self, name, args, kwargs):
        written = 0
        for t in _tensors((args, kwargs)):
            key = _storage_key(t)
            if key in self._pending:
                written += self._pending.pop(key)
        self._record(f"triton:{name}", 1, written)

    def report(self) -> TrafficReport:
        return TrafficReport(
            ops=[dataclasses.replace(o) for o in self._counts.values()],
            host_syncs=self._host_syncs,
            unwritten_allocation_bytes=self._unwritten + sum(self._pending.values()),
        )


class _BackwardLabel(torch.autograd.Function):
    """Identity (views) whose backward sets the counter's section; see label_backward."""

    @staticmethod
    def forward(ctx, counter, name, *tensors):
        ctx.counter, ctx.name = counter, name
        ctx.set_materialize_grads(False)  # no zero-filled gradients: they would be counted
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.counter._section = ctx.name
        return (None, None, *grads)


def count_traffic(fn, *args, execute_triton: bool = True, **kwargs) -> TrafficReport:
    """Run ``fn(*args, **kwargs)`` once under a :class:`TrafficCounter` and return its report."""
    with TrafficCounter(execute_triton=execute_triton) as counter:
        fn(*args, **kwargs)
    return counter.report()
