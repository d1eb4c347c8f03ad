"""Kernel benchmarks without pytest-benchmark (what ``gpu_run.sh`` runs).

    python benchmarks/run_kernels.py --out DIR [--quick] [--batch 32] [--dtype bf16]
                                     [--ops mbconv,feedforward] [--max-seconds 150]

Times every case of ``kernel_cases.py`` (fused op vs its peers, per stage of MaxViT-T, forward
and forward + backward) with CUDA events: 3 warm-up calls (the first includes any compilation),
then 5 repeats of enough calls for >= 25 ms each; the median time per call. Writes
``DIR/kernels.json`` (every figure, updated as it runs) and ``DIR/kernels.md``.

Achieved GB/s = the case's ideal bytes / time, and its fraction of the measured device-to-device
copy bandwidth; TFLOP/s and its fraction of a measured bf16 matmul. Peers are checked against
the reference before they are timed (a peer that computes something else is reported, not timed).
Compiled peers run last, so that a time budget cuts them first. Without CUDA it writes a JSON
that says so and exits 0, unless ``--cpu`` (reference peers only, for trying the script).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import kernel_cases as kc  # noqa: E402
from maxvit_fast.bench import Progress, environment, measure_roofline, time_per_call, write_json  # noqa: E402
from maxvit_fast.dispatch import FusedFallbackWarning, reset_fallback_warnings  # noqa: E402
from maxvit_fast.traffic import triton_launches  # noqa: E402

QUICK_STAGES = (0, 2)  # stages 1 and 3 of MaxViT-T
COMPILED_IMPLS = ("compile", "flex")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/latest", help="output folder")
    p.add_argument("--quick", action="store_true", help=f"stages {[s + 1 for s in QUICK_STAGES]} only")
    p.add_argument("--stages", default=None, help="comma list of stages (1-4)")
    p.add_argument("--ops", default=None, help=f"comma list from {','.join(kc.IMPLS)}")
    p.add_argument("--impls", default=None, help="comma list of implementations")
    p.add_argument("--directions", default="fwd,fwd+bwd")
    p.add_argument("--batch", type=int, default=kc.default_batch())
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--max-seconds", type=float, default=None, help="skip cases not started by then")
    p.add_argument("--cpu", action="store_true", help="without CUDA: run the non-fused, non-compiled peers on the CPU")
    return p.parse_args(argv)


def run_case(spec, args, dtype, device, roofline) -> dict:
    entry = {"id": spec.id, "op": spec.op, "stage": spec.stage + 1, "impl": spec.impl, "direction": spec.direction}
    reset_fallback_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FusedFallbackWarning)
        t0 = time.perf_counter()
        built = kc.build_case(spec, args.batch, dtype, device)
        entry["shape"] = built.shape
        entry["relative_error_vs_reference"] = kc.check_agreement(built, dtype)
        built.fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        entry["first_call_s"] = time.perf_counter() - t0
        with triton_launches() as tally:
            built.fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        entry["triton_launches_per_call"] = tally.total
        one = statistics.median(time_per_call(built.fn, device, 1, 3))
        iters = max(1, min(200, math.ceil(0.025 / max(one, 1e-7))))
        times = time_per_call(built.fn, device, iters, 5)
    median = statistics.median(times)
    fallbacks = sorted({str(w.message) for w in caught if issubclass(w.category, FusedFallbackWarning)})
    entry.update(
        status="ok", median_s=median, repeats_s=times, iters_per_repeat=iters,
        ideal_bytes=built.ideal_bytes, flops=built.flops,
        gb_per_s=built.ideal_bytes / median / 1e9, tflops_per_s=built.flops / median / 1e12,
        fallbacks=fallbacks,
    )
    copy_bw, mm = roofline.get("copy_bytes_per_s"), roofline.get("bf16_matmul_flops_per_s")
    entry["fraction_of_copy_bandwidth"] = built.ideal_bytes / median / copy_bw if copy_bw else None
    entry["fraction_of_bf16_matmul"] = built.flops / median / mm if mm else None
    if spec.impl == "fused" and tally.total == 0:
        entry["status"] = "fallback"
        entry["note"] = "no Triton kernel ran (reference path): " + ("; ".join(fallbacks) or "unknown reason")
    return entry


def add_speedups(cases):
    ref = {(c["op"], c["stage"], c["direction"]): c for c in cases if c["impl"] == "reference" and c["status"] == "ok"}
    for c in cases:
        r = ref.get((c["op"], c["stage"], c["direction"]))
        if r and c.get("median_s"):
            c["speedup_vs_reference"] = r["median_s"] / c["median_s"]


def markdown(doc) -> str:
    lines = [f"# Kernel benchmarks: {doc['device'].get('name')}", ""]
    roof = doc.get("roofline", {})
    if roof.get("copy_bytes_per_s"):
        lines.append(f"Measured roofline: device-to-device copy {roof['copy_bytes_per_s'] / 1e9:,.0f} GB/s, "
                     f"bf16 matmul {roof['bf16_matmul_flops_per_s'] / 1e12:,.0f} TFLOP/s. "
                     f"Batch {doc['batch']}, {doc['dtype']}, torch {doc['versions']['torch']}, "
                     f"triton {doc['versions'].get('triton')}.")
    lines.append("")
    lines.append("Time per call (median); GB/s = ideal bytes / time; % = of the measured copy bandwidth; "
                 "x = speed-up over the reference.")
    for op in kc.IMPLS:
        cases = [c for c in doc["cases"] if c["op"] == op]
        if not cases:
            continue
        impls = [i for i in kc.IMPLS[op] if any(c["impl"] == i for c in cases)]
        lines += ["", f"## {op}", "", "| stage | direction | " + " | ".join(impls) + " |",
                  "|---|---|" + "---|" * len(impls)]
        for stage in sorted({c["stage"] for c in cases}):
            for direction in kc.DIRECTIONS:
                row = {c["impl"]: c for c in cases if c["stage"] == stage and c["direction"] == direction}
                if not row:
                    continue
                cells = []
                for impl in impls:
                    c = row.get(impl)
                    if c is None:
                        cells.append("-")
                    elif c.get("median_s") and c["status"] in ("ok", "fallback"):
                        frac = c.get("fraction_of_copy_bandwidth")
                        text = f"{c['median_s'] * 1e6:,.0f} us, {c['gb_per_s']:,.0f} GB/s"
                        text += f" ({frac:.0%})" if frac else ""
                        text += f", {c['speedup_vs_reference']:.2f}x" if c.get("speedup_vs_reference") else ""
                        text += " (fell back)" if c["status"] == "fallback" else ""
                        cells.append(text)
                    else:
                        cells.append(f"{c['status']}: {c.get('note', '')}"[:80].replace("|", "/"))
                lines.append(f"| {stage} | {direction} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, "kernels.json"), os.path.join(args.out, "kernels.md")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    doc = {"schema": "maxvit-kernels/1", "command": " ".join(sys.argv), **environment(device),
           "batch": args.batch, "dtype": args.dtype, "cases": []}
    if not cuda and not args.cpu:
        doc["note"] = "not measured: the kernel benchmarks need a CUDA device"
        write_json(json_path, doc)
        print(doc["note"])
        return 0
    stages = tuple(int(s) - 1 for s in args.stages.split(",")) if args.stages else (QUICK_STAGES if args.quick else (0, 1, 2, 3))
    specs = kc.all_specs(
        ops_filter=args.ops.split(",") if args.ops else None, stages=stages,
        directions=tuple(args.directions.split(",")), impls=args.impls.split(",") if args.impls else None,
    )
    if not cuda:  # --cpu: what can run on a CPU
        specs = [s for s in specs if s.impl not in ("fused", *COMPILED_IMPLS)]
    specs.sort(key=lambda s: (s.impl in COMPILED_IMPLS, list(kc.IMPLS).index(s.op), s.stage, s.direction))
    doc["roofline"] = measure_roofline(device)
    dtype = DTYPES[args.dtype]
    progress = Progress(len(specs), "kernels")
    started = time.perf_counter()
    try:
        for spec in specs:
            progress.step(spec.id)
            if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                entry = {"id": spec.id, "op": spec.op, "stage": spec.stage + 1, "impl": spec.impl,
                         "direction": spec.direction, "status": "skipped", "note": f"--max-seconds {args.max_seconds:g} reached"}
            else:
                try:
                    entry = run_case(spec, args, dtype, device, doc["roofline"])
                except Exception as e:  # one case failing must not lose the others
                    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    entry = {"id": spec.id, "op": spec.op, "stage": spec.stage + 1, "impl": spec.impl,
                             "direction": spec.direction, "status": "failed", "note": msg}
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            doc["cases"].append(entry)
            add_speedups(doc["cases"])
            write_json(json_path, doc)
            progress.advance()
    finally:
        progress.close()
    with open(md_path, "w") as f:
        f.write(markdown(doc))
    print(markdown(doc))
    print(f"json: {json_path}\nmarkdown: {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
