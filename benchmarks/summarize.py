"""Summarise one results folder of ``gpu_run.sh`` into ``summary.md`` (and plots).

    python benchmarks/summarize.py benchmarks/results/<device>-<date>

Reads what is there (env.json, steps.tsv, gpu_tests.xml, kernels.json, bench-*.json,
traffic-*.json) and says "missing" for what is not: a step cut by its time limit still leaves
its partial JSON, which is summarised as far as it goes. Draws ``bench-*.png`` from each
bench JSON when matplotlib is installed (so a run killed before its own --plot still has one).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tests(folder) -> list[str]:
    path = os.path.join(folder, "gpu_tests.xml")
    if not os.path.exists(path):
        return ["GPU tests: no result (see gpu_tests.log)."]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return ["GPU tests: unreadable junit file (see gpu_tests.log)."]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    lines = [f"GPU tests (`pytest tests -m gpu`): {passed} passed, {total['failures']} failed, "
             f"{total['errors']} errors, {total['skipped']} skipped."]
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            lines.append(f"- FAILED `{case.get('classname')}::{case.get('name')}` {msg}")
    return lines


def _bench_table(doc) -> list[str]:
    from maxvit_fast.bench import PATH_LABELS, PATHS

    cfg = doc.get("config", {})
    lines = [f"`{doc.get('command', '')}` ({cfg.get('mode')}, {cfg.get('dtype')}, image {cfg.get('image_size')}, "
             f"warm-up {cfg.get('warmup')}, {cfg.get('repeats')} x {cfg.get('iters')} timed calls, median)", "",
             "| path | batch | images/s | vs eager | vs compile | peak MiB | note |", "|---|---|---|---|---|---|---|"]
    results = sorted(doc.get("results", []), key=lambda r: (PATHS.index(r["path"]), r.get("batch_size") or 0))
    for r in results:
        ok = r.get("status") == "ok"

        def x(v):
            return f"{v:.2f}x" if v else "-"

        mem = r.get("peak_memory_bytes")
        note = r.get("note", "")
        if ok and r.get("relative_error_vs_eager") is not None:
            note = f"rel. err vs eager {r['relative_error_vs_eager']:.1e}" + (f"; {note}" if note else "")
        lines.append(
            f"| {PATH_LABELS[r['path']]} | {r.get('batch_size', '-')} | "
            f"{(format(r['images_per_s'], ',.1f') if ok else r.get('status', '-'))} | "
            f"{x(r.get('speedup_vs_eager')) if ok else '-'} | {x(r.get('speedup_vs_compile')) if ok else '-'} | "
            f"{(format(mem / 2**20, ',.0f') if mem else '-')} | {note.replace('|', '/')[:200]} |"
        )
    return lines


def _traffic(doc) -> list[str]:
    t = doc.get("traffic")
    if not t:
        return ["(no traffic section)"]
    ref, fus = t["paths"]["reference"], t["paths"]["fused"]
    r = t["ratio"]
    return [
        f"{t['dtype']}, batch {t['batch_size']}, image {t['image_size']}: reference "
        f"{ref['bytes_per_image'] / 2**20:,.1f} MiB/image, {ref['launches_per_forward']} launches; fused "
        f"{fus['bytes_per_image'] / 2**20:,.1f} MiB/image, {fus['launches_per_forward']} launches "
        f"({fus['triton_launches']} Triton). Fused/reference: bytes {r['bytes']:.1%}, launches {r['launches']:.1%} "
        f"(target {t['target_ratio']:.0%})."
    ]


def _plot(doc, path):
    from maxvit_fast.bench import write_plot

    cfg = doc.get("config", {})
    title = (f"MaxViT {cfg.get('preset')}, {cfg.get('image_size')}px, {cfg.get('dtype')}, {cfg.get('mode')} - "
             f"{doc.get('device', {}).get('name')}")
    return write_plot(path, [r for r in doc.get("results", []) if r.get("batch_size") is not None], title)


def summarize(folder: str) -> str:
    env = _load(os.path.join(folder, "env.json")) or {}
    lines = [f"# maxvit_fast GPU run: {env.get('device', 'unknown device')}", ""]
    if env:
        lines.append(f"Date {env.get('date')}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA "
                     f"{env.get('cuda')}; modules: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in env.get("modules", {}).items()))
        for note in env.get("notes", []):
            lines.append(f"- {note}")
    steps = os.path.join(folder, "steps.tsv")
    if os.path.exists(steps):
        lines += ["", "| step | exit | seconds |", "|---|---|---|"]
        with open(steps) as f:
            for row in f:
                parts = row.rstrip("\n").split("\t")
                if len(parts) == 3:
                    rc = parts[1] + (" (time limit)" if parts[1] in ("124", "137") else "")
                    lines.append(f"| {parts[0]} | {rc} | {parts[2]} |")
    lines += ["", "## Tests", ""] + _tests(folder)

    for title, sub in (("Kernels", ""), ("1x1 convs: Triton vs cuBLAS + epilogue", "conv1x1")):
        lines += ["", f"## {title}", ""]
        kernels_md = os.path.join(folder, sub, "kernels.md")
        if os.path.exists(kernels_md):
            with open(kernels_md) as f:
                body = f.read().split("\n", 1)[-1]  # without its title
            lines.append(body.replace("\n## ", "\n### "))
        else:
            lines.append(f"missing (see {sub or 'kernels'}.log)")

    lines += ["", "## maxvit-bench", ""]
    for path in sorted(glob.glob(os.path.join(folder, "bench-*.json"))):
        doc = _load(path)
        name = os.path.basename(path)[:-5]
        lines += [f"### {name}", ""]
        if doc is None:
            lines.append("unreadable")
            continue
        lines += _bench_table(doc)
        png = os.path.join(folder, name + ".png")
        problem = _plot(doc, png)
        lines += ["", f"![{name}]({name}.png)" if not problem else f"({problem})", ""]
        for note in doc.get("notes", []):
            lines.append(f"- {note}")

    lines += ["", "## Memory-traffic model", ""]
    for path in sorted(glob.glob(os.path.join(folder, "traffic-*.json"))):
        doc = _load(path)
        lines += [f"- {os.path.basename(path)}: " + " ".join(_traffic(doc or {}))]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python benchmarks/summarize.py RESULTS_FOLDER", file=sys.stderr)
        return 2
    text = summarize(argv[0])
    with open(os.path.join(argv[0], "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
