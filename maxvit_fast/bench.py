"""``maxvit-bench``: end-to-end throughput of every MaxViT path, side by side.

Paths (``--paths``):
  eager          the reference PyTorch modules (``MaxViT(fused=False)``)
  compile        ``torch.compile`` of the reference
  fused          ``MaxViT(fused=True)``: the Triton kernels (CUDA only)
  fused-graph    the fused model captured in a CUDA graph (CUDA only)
  fused-compile  ``torch.compile`` of the fused model (CUDA only; skipped with a note if it fails)

Inference (eval mode, no grad) by default; ``--train`` times a full training step (forward,
cross-entropy, backward, AdamW step) in train mode. Timing: ``--warmup`` untimed calls, then
``--repeats`` x ``--iters`` timed calls (CUDA events on a GPU, ``perf_counter`` on a CPU); the
figure is the median over repeats of the time per call. Peak memory per path on a GPU.

``--traffic`` reports instead, per image and per forward, the activation bytes each path writes
and its kernel launches (see ``maxvit_fast/traffic.py``). ``--interpret`` (CPU) checks the fused
path's output through the Triton interpreter on a tiny input (a correctness check, never a speed).

Arguments are parsed before ``maxvit_fast`` is imported: the Triton interpreter must be switched
on (``TRITON_INTERPRET=1``) before ``maxvit_fast.kernels`` is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings

PATHS = ("eager", "compile", "fused", "fused-graph", "fused-compile")
PATH_LABELS = {
    "eager": "reference (eager)",
    "compile": "reference + torch.compile",
    "fused": "fused",
    "fused-graph": "fused + CUDA graph",
    "fused-compile": "fused + torch.compile",
}
RUN_ORDER = ("eager", "fused", "fused-graph", "compile", "fused-compile")
CUDA_ONLY_PATHS = ("fused", "fused-graph", "fused-compile")
COMPILED_PATHS = ("compile", "fused-compile")
DTYPES = ("fp32", "fp16", "bf16", "autocast")
PRESET_NAMES = ("tiny", "small", "base", "large")
TRAFFIC_TARGET = 0.25  # fused / reference, bytes and launches

# Defaults that depend on the device (None on the command line means "use these").
CUDA_DEFAULTS = dict(batch_sizes=[1, 8, 32, 128], dtype="bf16", warmup=10, iters=20, repeats=5)
# About a minute on a small CPU once torch.compile's cache is warm (the first compile of the
# tiny preset takes 1-2 minutes on 2 cores; --no-compile skips it).
CPU_DEFAULTS = dict(batch_sizes=[1], dtype="fp32", warmup=3, iters=3, repeats=5)
TRAFFIC_DEFAULTS = dict(batch_sizes=[1], dtype="fp32")

# --interpret: the fused path through the Triton interpreter on a tiny input.
INTERPRET_DEPTH = (1, 1)
INTERPRET_IMAGE_SIZE = 56
INTERPRET_BATCH = 2
INTERPRET_TOLERANCE = 1e-4  # normwise relative error, fp32


class BenchError(Exception):
    """A bad argument found after parsing (reported like an argparse error, exit status 2)."""


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_nonnegative_int = _int_at_least(0, "non-negative")


def _int_list(tokens, what: str) -> list[int]:
    values = []
    for token in tokens:
        for part in str(token).split(","):
            if not part.strip():
                continue
            try:
                value = int(part)
            except ValueError:
                raise BenchError(f"{what} must be positive integers, got {part!r}") from None
            if value < 1:
                raise BenchError(f"{what} must be positive integers, got {value}")
            values.append(value)
    if not values:
        raise BenchError(f"{what}: no values given")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maxvit-bench",
        description="Images/s of every MaxViT path side by side (reference, torch.compile, fused "
        "Triton kernels, fused in a CUDA graph, fused + compile); --traffic for the memory-traffic "
        "model. Defaults depend on the device: on CUDA batch sizes 1,8,32,128 in bf16; on a CPU "
        "batch 1 in fp32 with few iterations (about a minute).",
    )
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny", help="model variant (default tiny)")
    p.add_argument("--image-size", type=_positive_int, default=224, help="image side (default 224)")
    p.add_argument("--batch-sizes", nargs="+", default=None, metavar="N",
                   help="batch sizes to sweep, e.g. 1,8,32 or 1 8 32")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameters and inputs in fp32/fp16/bf16, or fp32 under bf16 autocast "
                   "(default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels-last memory format")
    p.add_argument("--train", action="store_true", help="time a full training step (fwd, bwd, AdamW step)")
    p.add_argument("--warmup", type=_nonnegative_int, default=None, help="untimed calls per measurement")
    p.add_argument("--iters", type=_positive_int, default=None, help="timed calls per repeat")
    p.add_argument("--repeats", type=_positive_int, default=None, help="repeats; the median is reported")
    p.add_argument("--paths", default=None, help=f"comma list from {','.join(PATHS)} (default all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile paths")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--depth", default=None,
                   help="override the preset's blocks per stage, e.g. 1,1 (a different, smaller model)")
    p.add_argument("--dim", type=_positive_int, default=None, help="override the preset's width")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: measurements not started by then are skipped (and say so)")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON (updated as it runs)")
    p.add_argument("--plot", metavar="PATH", help="PNG of images/s against batch size per path (needs matplotlib)")
    p.add_argument("--traffic", action="store_true",
                   help="report activation bytes written and kernel launches per image/forward "
                   "(reference vs fused) instead of timing; with --train, per training step "
                   "(forward + backward)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: also run the fused path through the Triton interpreter on a tiny input "
                   "and compare it to the reference (correctness only, never a speed)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.batch_sizes is not None:
            args.batch_sizes = sorted(set(_int_list(args.batch_sizes, "--batch-sizes")))
        if args.depth is not None:
            args.depth = tuple(_int_list([args.depth], "--depth"))
        if args.paths is not None:
            names = [s.strip() for s in args.paths.split(",") if s.strip()]
            unknown = [n for n in names if n not in PATHS]
            if unknown or not names:
                raise BenchError(f"--paths: unknown path(s) {unknown or names}; choose from {', '.join(PATHS)}")
            args.paths = [n for n in PATHS if n in names]
        if args.max_seconds is not None and not args.max_seconds > 0:
            raise BenchError(f"--max-seconds must be positive, got {args.max_seconds}")
    except BenchError as e:
        parser.error(str(e))
    args._parser = parser
    return args


# ------------------------------------------------------------------------------------------------
# Small utilities
# ------------------------------------------------------------------------------------------------


class Progress:
    """tqdm when installed, plain prints otherwise."""

    def __init__(self, total: int, desc: str):
        self.total, self.done = total, 0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, desc=desc, unit="run", file=sys.stderr) if tqdm and total else None

    def step(self, label: str):
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, message: str):
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn, device, iters: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` for each repeat of ``iters`` back-to-back calls."""
    import torch

    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
    return times


def measure_roofline(device, copy_bytes: int = 1 << 30, matmul_n: int = 8192, iters: int = 10) -> dict:
    """Measured device-to-device copy bandwidth (read + write bytes / s) and bf16 matmul FLOP/s:
    the two roofs every kernel figure is compared to."""
    import torch

    if device.type != "cuda":
        return {"copy_bytes_per_s": None, "bf16_matmul_flops_per_s": None, "note": "not measured (no CUDA)"}

    def seconds(fn):
        for _ in range(3):
            fn()
        return statistics.median(time_per_call(fn, device, iters, 3))

    def copy_seconds():
        src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        return seconds(lambda: dst.copy_(src))

    def matmul_seconds():
        a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
        b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
        return seconds(lambda: a @ b)

    copy_s = copy_seconds()
    mm_s = matmul_seconds()
    torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": 2 * copy_bytes / copy_s,
        "copy_size_bytes": copy_bytes,
        "bf16_matmul_flops_per_s": 2 * matmul_n**3 / mm_s,
        "matmul_n": matmul_n,
    }


def environment(device) -> dict:
    import torch

    info = {
        "device": {"type": device.type},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    try:
        import triton

        info["versions"]["triton"] = triton.__version__
    except ImportError:
        info["versions"]["triton"] = None
    try:
        import maxvit_fast

        info["versions"]["maxvit_fast"] = maxvit_fast.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"].update(
            name=props.name, capability=f"{props.major}.{props.minor}",
            memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
        )
        info["versions"]["cuda"] = torch.version.cuda
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["device"].update(name=name, threads=torch.get_num_threads(), cpus=os.cpu_count())
    return info


def write_json(path: str | None, doc: dict):
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.1f}"


# ------------------------------------------------------------------------------------------------
# Model, inputs, and the callable each path times
# ------------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "autocast": torch.float32}[name]


def _precision_context(args, device):
    import torch

    if args.dtype == "autocast":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _make_input(args, batch: int, device, model_kwargs):
    import torch

    g = torch.Generator().manual_seed(args.seed * 1_000_003 + batch)
    x = torch.randn(batch, model_kwargs.get("channels", 3), args.image_size, args.image_size, generator=g)
    target = torch.randint(0, model_kwargs["num_classes"], (batch,), generator=g)
    x = x.to(device=device, dtype=_torch_dtype(args.dtype))
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, target.to(device)


def _place_model(base, args, device, fused: bool):
    import torch

    model = copy.deepcopy(base)
    model.fused = fused
    model.to(device=device, dtype=_torch_dtype(args.dtype))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train(args.train)
    return model


class PathRunner:
    """Builds, per batch size, the zero-argument callable that one path times."""

    def __init__(self, path: str, base, args, device):
        import torch

        self.path, self.args, self.device = path, args, device
        self.model = _place_model(base, args, device, fused=path.startswith("fused"))
        self.precision = _precision_context(args, device)
        self.forward = self.model
        if path in COMPILED_PATHS:
            torch._dynamo.reset()
            self.forward = torch.compile(self.model, mode=args.compile_mode)
        self.optimizer = None
        if args.train:
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=1e-5, capturable=(path == "fused-graph")
            )

    def _loss(self, x, target):
        import torch.nn.functional as F

        with self.precision():
            return F.cross_entropy(self.forward(x).float(), target)

    def _train_step(self, x, target):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(x, target)
        loss.backward()
        self.optimizer.step()
        return loss

    def _infer(self, x):
        import torch

        with torch.no_grad(), self.precision():
            return self.forward(x)

    def callable_for(self, x, target):
        """``fn`` where ``fn()`` runs one call (forward, or training step) and returns its output."""
        if self.path == "fused-graph":
            return self._graph(x, target)
        if self.args.train:
            return lambda: self._train_step(x, target)
        return lambda: self._infer(x)

    def _graph(self, x, target):
        """Capture one call (inference forward, or the whole training step) in a CUDA graph
        after three warm-up calls on a side stream (the pattern of the PyTorch CUDA graph docs)."""
        import torch

        step = (lambda: self._train_step(x, target)) if self.args.train else (lambda: self._infer(x))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
            # A step that waits for the host (.item(), a data-dependent shape) cannot be captured,
            # and a failed capture can leave the device unusable: find out first, safely.
            torch.cuda.synchronize(self.device)
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError as e:
                raise RuntimeError(f"not capturable: the step synchronises with the host ({_first_line(e, 160)})") from None
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_out = step()
        self.graph = graph  # keep alive

        def replay():
            graph.replay()
            return static_out

        return replay

    def close(self):
        self.graph = None
        self.forward = self.model = self.optimizer = None


# ------------------------------------------------------------------------------------------------
# The timing run
# ------------------------------------------------------------------------------------------------


def _relative_error(y, ref) -> float:
    y, ref = y.detach().float().cpu(), ref.detach().float().cpu()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def measure(runner: PathRunner, batch: int, args, device, model_kwargs, progress: Progress) -> dict:
    """One (path, batch size) measurement."""
    import torch

    from .dispatch import FusedFallbackWarning, reset_fallback_warnings
    from .traffic import triton_launches

    x, target = _make_input(args, batch, device, model_kwargs)
    result = {"path": runner.path, "batch_size": batch}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reset_fallback_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FusedFallbackWarning)
        t0 = time.perf_counter()
        fn = runner.callable_for(x, target)
        out = fn()
        _sync(device)
        result["first_call_s"] = time.perf_counter() - t0  # includes compilation / graph capture
        if runner.path == "fused":
            with triton_launches() as tally:
                out = fn()
                _sync(device)
            result["triton_launches_per_call"] = tally.total
        for _ in range(max(args.warmup - 1, 0)):
            out = fn()
        _sync(device)
        times = time_per_call(fn, device, args.iters, args.repeats)
    fallbacks = sorted({str(w.message) for w in caught if issubclass(w.category, FusedFallbackWarning)})
    median = statistics.median(times)
    result.update(
        status="ok",
        seconds_per_call_median=median,
        seconds_per_call_repeats=times,
        images_per_s=batch / median,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        fallbacks=fallbacks,
    )
    if not args.train:
        result["output"] = out.detach().float().cpu()
    if runner.path.startswith("fused") and fallbacks:
        result["note"] = "fell back to the reference for some ops: " + "; ".join(fallbacks)
    return result


def _plan(args, cuda: bool) -> tuple[list[str], list[dict]]:
    """The paths to run and the ones skipped up front (with their reason)."""
    paths = list(args.paths or PATHS)
    skipped = []
    for path in list(paths):
        reason = None
        if path in COMPILED_PATHS and args.no_compile:
            reason = "skipped (--no-compile)"
        elif path in CUDA_ONLY_PATHS and not cuda:
            reason = "not measured: the fused Triton kernels need a CUDA device"
        if reason:
            paths.remove(path)
            skipped.append({"path": path, "status": "skipped", "note": reason})
    return paths, skipped


def run_timing(args, base, model_kwargs, device, doc, notes) -> list[dict]:
    import torch

    paths, skipped = _plan(args, device.type == "cuda")
    paths.sort(key=RUN_ORDER.index)  # the slow-to-build compiled paths last (a time budget cuts them first)
    results = list(skipped)
    doc["results"] = results
    progress = Progress(len(paths) * len(args.batch_sizes), "maxvit-bench")
    started = time.perf_counter()
    eager_outputs = {}
    stop_all = False
    try:
        for path in paths:
            stop_reason = None
            runner = None
            for batch in args.batch_sizes:
                label = f"{PATH_LABELS[path]}, batch {batch}"
                progress.step(label)
                entry = {"path": path, "batch_size": batch}
                if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                    stop_reason = stop_reason or f"skipped: --max-seconds {args.max_seconds:g} reached"
                if stop_all:
                    stop_reason = "skipped: an earlier CUDA error"
                if stop_reason:
                    entry.update(status="skipped", note=stop_reason)
                else:
                    try:
                        if runner is None:
                            runner = PathRunner(path, base, args, device)
                        if path in COMPILED_PATHS and batch == args.batch_sizes[0]:
                            progress.write(f"{label}: compiling (the first call includes torch.compile)")
                        entry = measure(runner, batch, args, device, model_kwargs, progress)
                    except torch.cuda.OutOfMemoryError as e:  # larger batches will not fit either
                        entry.update(status="failed", note=f"out of memory: {_first_line(e, 120)}")
                        stop_reason = f"skipped: out of memory at batch {batch}"
                    except Exception as e:  # a path that cannot run is reported, not fatal
                        entry.update(status="failed", note=_first_line(e))
                        stop_reason = f"skipped: failed at batch {batch}"
                    finally:
                        if device.type == "cuda":
                            try:
                                torch.cuda.synchronize(device)
                            except RuntimeError as e:  # the device is unusable: stop, keep what we have
                                notes.append(f"stopped: CUDA error after {label}: {_first_line(e)}")
                                stop_all = True
                out = entry.pop("output", None)
                if out is not None:
                    if path == "eager":
                        eager_outputs[batch] = out
                    elif batch in eager_outputs:
                        entry["relative_error_vs_eager"] = _relative_error(out, eager_outputs[batch])
                if entry.get("status") == "ok" and path.startswith("fused") and path != "fused-graph" \
                        and entry.get("triton_launches_per_call") == 0:
                    entry["note"] = ("no Triton kernel ran: this is the reference path. "
                                     + entry.get("note", ""))
                results.append(entry)
                _add_speedups(results)
                write_json(args.json, doc)
                progress.advance()
            if runner is not None:
                runner.close()
                del runner
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        progress.close()
    if device.type != "cuda":
        notes.append("The fused Triton kernels need a CUDA device: on this machine only the reference "
                     "(eager and torch.compile) is timed. `--interpret` checks the fused path's output "
                     "through the Triton interpreter (correctness only, not a speed).")
    return results


def _add_speedups(results: list[dict]):
    by_key = {(r["path"], r.get("batch_size")): r for r in results if r.get("status") == "ok"}
    for r in results:
        if r.get("status") != "ok":
            continue
        for ref_path, field in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            ref = by_key.get((ref_path, r["batch_size"]))
            r[field] = ref["seconds_per_call_median"] / r["seconds_per_call_median"] if ref else None


def format_table(results: list[dict], train: bool) -> str:
    unit = "train images/s" if train else "images/s"
    header = ["path", "batch", unit, "vs eager", "vs compile", "peak MiB", "1st call s", "note"]
    rows, order = [], []
    for r in results:
        order.append((PATHS.index(r["path"]), r.get("batch_size") or 0))
        if r.get("batch_size") is None:
            rows.append([PATH_LABELS[r["path"]], "-", "-", "-", "-", "-", "-", r.get("note", "")])
            continue
        ok = r.get("status") == "ok"

        def ratio(v):
            return f"{v:.2f}x" if v else "-"

        note = r.get("note", "")
        if ok and r.get("relative_error_vs_eager") is not None:
            note = (f"rel. err vs eager {r['relative_error_vs_eager']:.1e}" + (f"; {note}" if note else ""))
        rows.append([
            PATH_LABELS[r["path"]], str(r["batch_size"]),
            f"{r['images_per_s']:,.1f}" if ok else r.get("status", "-"),
            ratio(r.get("speedup_vs_eager")) if ok else "-",
            ratio(r.get("speedup_vs_compile")) if ok else "-",
            _mib(r.get("peak_memory_bytes")) if ok else "-",
            f"{r['first_call_s']:.1f}" if ok else "-",
            note,
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the note column is left ragged

    def line(cells):
        return "  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), line(["-" * w for w in widths])]
    rows = [row for _, row in sorted(zip(order, rows), key=lambda t: t[0])]
    out += [line(row) for row in rows]
    return "\n".join(out)


def write_plot(path: str, results: list[dict], title: str) -> str | None:
    """The PNG, or the reason there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for p in PATHS:
        points = sorted((r["batch_size"], r["images_per_s"]) for r in results
                        if r["path"] == p and r.get("status") == "ok")
        if points:
            ax.plot(*zip(*points), marker="o", label=PATH_LABELS[p])
            drawn += 1
    batches = sorted({r["batch_size"] for r in results if r.get("status") == "ok"})
    if len(batches) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches]) if batches else None
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------------
# Traffic
# ------------------------------------------------------------------------------------------------


# the section of the loss's, the head's, the register means' and the stem's backward
_BACKWARD_REST = "stem, head, register mean (backward)"


@contextlib.contextmanager
def _sections(counter):
    """Label what each of the model's ops writes (wraps the functions in maxvit_fast.ops that the
    model calls through the module attribute), in the forward and, when autograd records, in the
    backward: each op's backward as "<section> (backward)" (TrafficCounter.label_backward)."""
    from . import ops

    originals = {name: getattr(ops, name) for name in ("mbconv", "window_attention_residual", "feedforward_residual")}
    last_pattern = ["block"]

    def labelled(name, fn, *a, **k):
        a, k = counter.label_backward((a, k), _BACKWARD_REST)
        with counter.section(name):
            out = fn(*a, **k)
        return counter.label_backward(out, f"{name} (backward)")

    def mbconv(*a, **k):
        return labelled("MBConv", originals["mbconv"], *a, **k)

    def window_attention_residual(x, registers, attn, pattern, *a, **k):
        last_pattern[0] = pattern
        return labelled(f"{pattern} attention", originals["window_attention_residual"],
                        x, registers, attn, pattern, *a, **k)

    def feedforward_residual(*a, **k):
        return labelled(f"{last_pattern[0]} feed-forward", originals["feedforward_residual"], *a, **k)

    ops.mbconv, ops.window_attention_residual, ops.feedforward_residual = (
        mbconv, window_attention_residual, feedforward_residual)
    try:
        with counter.section("stem, head, register mean"):
            yield
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)


def run_traffic(args, base, model_kwargs, device, doc, notes) -> dict:
    import torch

    from .dispatch import FusedFallbackWarning, reset_fallback_warnings, triton_interpreting
    from .traffic import TrafficCounter

    batch = args.batch_sizes[0]
    x, _ = _make_input(args, batch, device, model_kwargs)
    target = torch.randint(0, model_kwargs.get("num_classes", 1000), (batch,), device=device)
    dry_run = device.type != "cuda"
    mode = "train" if args.train else "eval"
    section = {"batch_size": batch, "image_size": args.image_size, "dtype": args.dtype, "mode": mode,
               "triton_dry_run": dry_run, "target_ratio": TRAFFIC_TARGET, "paths": {}}

    def step(model, counter=None):
        # eval: one forward; train: forward + backward of the cross-entropy (no optimizer step:
        # it is the same for both paths); the backward's ops are counted per section (_sections)
        if not args.train:
            return model(x)
        model.zero_grad(set_to_none=True)  # as a training loop does: no accumulation into .grad
        loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        with counter.section(_BACKWARD_REST) if counter is not None else contextlib.nullcontext():
            loss.backward()
    if dry_run:
        section["note"] = ("CPU: Triton launches were recorded but not executed (dry run): the counts "
                           "are those of the GPU code path; no outputs were computed.")
        if not triton_interpreting():
            section["note"] += (" The kernels were imported without TRITON_INTERPRET=1, so the fused "
                                "path falls back to the reference here; run maxvit-bench as its own process.")
    for name, fused in (("reference", False), ("fused", True)):
        model = _place_model(base, args, device, fused=fused).train(args.train)
        reset_fallback_warnings()
        with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(args.train):
            warnings.simplefilter("always", FusedFallbackWarning)
            with _precision_context(args, device)():
                with TrafficCounter(execute_triton=not dry_run):  # warm-up: caches, first-call work
                    step(model)
                with TrafficCounter(execute_triton=not dry_run) as counter, _sections(counter):
                    step(model, counter)
        report = counter.report()
        entry = report.to_dict(per=batch)
        entry["bytes_per_image"] = entry.pop("bytes")
        entry["launches_per_forward"] = entry.pop("launches")
        entry["fallbacks"] = sorted({str(w.message) for w in caught if issubclass(w.category, FusedFallbackWarning)})
        section["paths"][name] = entry
        del model
    ref, fus = section["paths"]["reference"], section["paths"]["fused"]
    section["ratio"] = {
        "bytes": fus["bytes_per_image"] / ref["bytes_per_image"] if ref["bytes_per_image"] else None,
        "launches": fus["launches_per_forward"] / ref["launches_per_forward"] if ref["launches_per_forward"] else None,
    }
    section["target_met"] = {k: (v is not None and v <= TRAFFIC_TARGET) for k, v in section["ratio"].items()}
    doc["traffic"] = section
    write_json(args.json, doc)
    return section


def format_traffic(section: dict, top: int = 12) -> str:
    ref, fus = section["paths"]["reference"], section["paths"]["fused"]
    lines = [
        f"Memory-traffic model: batch {section['batch_size']}, image {section['image_size']}, "
        f"{section['dtype']}; bytes of activations written per image, kernel launches per "
        + ("training step (forward + backward)" if section.get("mode") == "train" else "forward"),
    ]
    if section.get("note"):
        lines.append(section["note"])
    lines.append("")
    w = 28
    lines.append(f"{'':{w}}  {'reference':>24}  {'fused':>24}")
    lines.append(f"{'section':{w}}  {'MiB/image':>12}{'launches':>12}  {'MiB/image':>12}{'launches':>12}")
    names = list(dict.fromkeys([*ref["by_section"], *fus["by_section"]]))
    for name in names:
        a = ref["by_section"].get(name, {"bytes": 0, "launches": 0})
        b = fus["by_section"].get(name, {"bytes": 0, "launches": 0})
        lines.append(f"{name:{w}}  {a['bytes'] / 2**20:12,.2f}{a['launches']:12d}  "
                     f"{b['bytes'] / 2**20:12,.2f}{b['launches']:12d}")
    lines.append(f"{'total':{w}}  {ref['bytes_per_image'] / 2**20:12,.2f}{ref['launches_per_forward']:12d}  "
                 f"{fus['bytes_per_image'] / 2**20:12,.2f}{fus['launches_per_forward']:12d}")
    lines.append(f"{'  of which Triton launches':{w}}  {'':12}{ref['triton_launches']:12d}  "
                 f"{'':12}{fus['triton_launches']:12d}")
    r = section["ratio"]

    def verdict(key):
        v = r[key]
        if v is None:
            return "n/a"
        if section.get("mode") == "train":  # the target is set for inference
            return f"{v:.1%}"
        return f"{v:.1%} ({'meets' if v <= TRAFFIC_TARGET else 'misses'} the {TRAFFIC_TARGET:.0%} target)"

    lines.append("")
    lines.append(f"fused / reference: bytes {verdict('bytes')}, launches {verdict('launches')}")
    for name, entry in (("reference", ref), ("fused", fus)):
        lines.append("")
        lines.append(f"{name}: top ops by bytes written per image")
        for o in entry["by_op"][:top]:
            lines.append(f"  {o['op']:44} {o['calls']:6d} calls {o['launches']:6d} launches {o['bytes'] / 2**20:10,.2f} MiB")
        if entry["fallbacks"]:
            lines.append("  fell back: " + "; ".join(entry["fallbacks"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# --interpret
# ------------------------------------------------------------------------------------------------


def run_interpret_check(args, model_kwargs, device, doc) -> dict:
    import torch

    from .dispatch import FusedFallbackWarning, reset_fallback_warnings, triton_interpreting
    from .model import MaxViT
    from .traffic import triton_launches

    kwargs = dict(model_kwargs, depth=INTERPRET_DEPTH)
    check = {"model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
             "image_size": INTERPRET_IMAGE_SIZE, "batch_size": INTERPRET_BATCH, "dtype": "fp32"}
    doc["interpret_check"] = check
    if device.type == "cuda":
        check.update(status="skipped", note="on CUDA the fused path runs the compiled kernels (timed above)")
        return check
    if not triton_interpreting():
        check.update(status="skipped", note="maxvit_fast.kernels was imported before TRITON_INTERPRET=1 was "
                     "set; run maxvit-bench --interpret as its own process")
        return check
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's generator
        torch.manual_seed(args.seed)
        model = MaxViT(**kwargs).eval()
        x = torch.randn(INTERPRET_BATCH, kwargs.get("channels", 3), INTERPRET_IMAGE_SIZE, INTERPRET_IMAGE_SIZE)
    reset_fallback_warnings()
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FusedFallbackWarning)
        reference = model(x)
        model.fused = True
        with triton_launches() as tally:
            fused = model(x)
    err = (fused - reference).abs().max().item()
    rel = _relative_error(fused, reference)
    ok = tally.total > 0 and rel <= INTERPRET_TOLERANCE and not math.isnan(rel)
    check.update(
        status="ok" if ok else "failed", max_abs_error=err, relative_error=rel, tolerance=INTERPRET_TOLERANCE,
        triton_launches=tally.total, seconds=time.perf_counter() - t0,
        fallbacks=sorted({str(w.message) for w in caught if issubclass(w.category, FusedFallbackWarning)}),
    )
    if tally.total == 0:
        check["note"] = "no Triton kernel ran"
    write_json(args.json, doc)
    return check


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def _resolve_defaults(args, cuda: bool):
    defaults = TRAFFIC_DEFAULTS if args.traffic else (CUDA_DEFAULTS if cuda else CPU_DEFAULTS)
    base = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    for key in ("batch_sizes", "dtype", "warmup", "iters", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key, base[key]))


def main(argv=None) -> int:
    args = parse_args(argv)
    parser = args._parser
    argv_list = list(sys.argv[1:] if argv is None else argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if not cuda and (args.interpret or args.traffic):
        # Before maxvit_fast.kernels is imported (see the module docstring).
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if cuda else "cpu")
    _resolve_defaults(args, cuda)

    from .model import image_size_ok, nearest_valid_sizes
    from .presets import preset_kwargs

    overrides = {}
    if args.depth is not None:
        overrides["depth"] = args.depth
    if args.dim is not None:
        overrides["dim"] = args.dim
    try:
        model_kwargs = preset_kwargs(args.preset, **overrides)
    except ValueError as e:
        parser.error(str(e))
    stages, window = len(model_kwargs["depth"]), model_kwargs["window_size"]
    if not image_size_ok(args.image_size, stages, window):
        near = nearest_valid_sizes(args.image_size, stages, window)
        parser.error(
            f"--image-size {args.image_size}: the {args.preset} preset ({stages} stages, window {window}) needs "
            f"every stage's feature map to divide by {window}; nearest valid sizes: {', '.join(map(str, near))}"
        )
    if args.plot and args.traffic:
        parser.error("--plot draws the timing results; it cannot be combined with --traffic")

    from .model import MaxViT

    try:
        with torch.random.fork_rng(devices=[]):  # seeded weights, without touching the caller's generator
            torch.manual_seed(args.seed)
            base = MaxViT(**model_kwargs)
    except ValueError as e:
        parser.error(f"cannot build the model: {e}")

    doc = {
        "schema": "maxvit-bench/1",
        "command": "maxvit-bench " + shlex.join(argv_list),
        "argv": argv_list,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(device),
        "config": {
            "preset": args.preset, "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_kwargs.items()},
            "parameters": sum(p.numel() for p in base.parameters()),
            "image_size": args.image_size, "batch_sizes": args.batch_sizes, "dtype": args.dtype,
            "autocast_dtype": "bf16" if args.dtype == "autocast" else None,
            "channels_last": args.channels_last, "mode": "train" if args.train else "inference",
            "warmup": args.warmup, "iters": args.iters, "repeats": args.repeats,
            "compile_mode": args.compile_mode, "timing": "CUDA events" if cuda else "time.perf_counter",
            "statistic": "median over repeats of seconds per call",
        },
        "notes": [],
    }
    notes = doc["notes"]
    d = doc["device"]
    mode = "training step" if args.train else "inference"
    print(f"maxvit-bench: {args.preset} ({doc['config']['parameters'] / 1e6:.1f}M parameters), image "
          f"{args.image_size}, {args.dtype}{', channels-last' if args.channels_last else ''}, {mode}, on "
          f"{d.get('name')} (torch {doc['versions']['torch']}, triton {doc['versions'].get('triton')})", flush=True)

    status = 0
    if args.traffic:
        section = run_traffic(args, base, model_kwargs, device, doc, notes)
        print(format_traffic(section))
    else:
        if cuda:
            doc["roofline"] = measure_roofline(device)
        if not cuda and not args.no_compile and (args.paths is None or "compile" in args.paths):
            print("note: torch.compile on a CPU takes 1-2 minutes the first time (cached afterwards); "
                  "--no-compile skips it", flush=True)
        results = run_timing(args, base, model_kwargs, device, doc, notes)
        print()
        print(format_table(results, args.train))
        if not any(r.get("status") == "ok" for r in results):
            status = 1
        if args.plot:
            title = (f"MaxViT {args.preset}, {args.image_size}px, {args.dtype}, {mode} - {d.get('name')}")
            problem = write_plot(args.plot, [r for r in results if r.get("batch_size") is not None], title)
            if problem:
                notes.append(problem)
            else:
                print(f"plot: {args.plot}")
    if args.interpret:
        check = run_interpret_check(args, model_kwargs, device, doc)
        if check["status"] == "ok":
            print(f"\n--interpret: fused path through the Triton interpreter ({check['triton_launches']} kernel "
                  f"launches, {check['seconds']:.0f} s) vs reference, depth {INTERPRET_DEPTH}, image "
                  f"{INTERPRET_IMAGE_SIZE}, batch {INTERPRET_BATCH}, fp32: max abs error "
                  f"{check['max_abs_error']:.2e}, relative error {check['relative_error']:.2e} (tolerance "
                  f"{INTERPRET_TOLERANCE:.0e}): OK. A correctness check only, not a speed.")
        elif check["status"] == "skipped":
            print(f"\n--interpret: skipped ({check['note']})")
        else:
            status = 1
            print(f"\n--interpret: FAILED: relative error {check.get('relative_error')} (tolerance "
                  f"{INTERPRET_TOLERANCE:.0e}), {check.get('triton_launches')} Triton launches"
                  + (f"; {check['note']}" if check.get("note") else ""))
    for note in notes:
        print(f"note: {note}")
    write_json(args.json, doc)
    if args.json:
        print(f"json: {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
