"""maxvit-bench, the memory-traffic counter, the presets and the benchmark peers.

The CLI runs in-process (``bench.main(argv)``) on a shrunken tiny preset (depth (1, 1), 56x56:
about a second on a CPU); one subprocess checks the module entry point and its exit status.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton
import triton.language as tl

from maxvit_fast import bench
from maxvit_fast.model import nearest_valid_sizes
from maxvit_fast.presets import PRESETS, VARIANTS, maxvit_tiny, preset_kwargs
from maxvit_fast.traffic import TrafficCounter, count_traffic, triton_launches

HAS_CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "tiny", "--depth", "1,1", "--image-size", "56"]


# ------------------------------------------------------------------------------------------------
# The traffic counter on toy code with known answers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2, mask=mask)


def _double(x, y):
    n = x.numel()
    _double_kernel[(triton.cdiv(n, 32),)](x, y, n, BLOCK=32)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_traffic_linear_relu_exact(device, dtype):
    batch, d_in, d_out = 5, 16, 8
    lin = torch.nn.Linear(d_in, d_out).to(device, dtype)
    x = torch.randn(batch, d_in, device=device, dtype=dtype)
    with torch.no_grad():
        report = count_traffic(lambda: torch.relu(lin(x)).reshape(-1)[:7].view(7, 1).t().unsqueeze(0))
    out_bytes = batch * d_out * x.element_size()
    ops = {o.op: o for o in report.by_op()}
    assert set(ops) == {"aten::addmm", "aten::relu"}, ops  # reshape/slice/view/t/unsqueeze: views, not counted
    assert ops["aten::addmm"].bytes == ops["aten::relu"].bytes == out_bytes
    assert report.bytes == 2 * out_bytes
    assert report.launches == 2 and report.triton_launches == 0


def test_traffic_copies_inplace_and_out_variants(device):
    x = torch.randn(3, 4, 6, device=device)
    buf = torch.empty(3, 6, 4, device=device)
    with TrafficCounter() as counter:
        y = x.permute(0, 2, 1).contiguous()  # a real copy (clone)
        y.add_(1.0)  # in place: writes y
        torch.mul(x.permute(0, 2, 1), 2.0, out=buf)  # out=: writes buf
        fresh = torch.empty_like(x)  # allocation: no launch, no bytes until written
        fresh.copy_(x)  # ... written here
    report = counter.report()
    nbytes = x.numel() * x.element_size()
    ops = {o.op.split(".")[0]: o for o in report.by_op()}
    assert set(ops) == {"aten::clone", "aten::add_", "aten::mul", "aten::copy_"}, ops
    assert all(o.bytes == nbytes and o.launches == 1 for o in ops.values())
    assert report.unwritten_allocation_bytes == 0


def test_traffic_sections_and_host_syncs(device):
    x = torch.randn(64, device=device)
    with TrafficCounter() as counter:
        with counter.section("a"):
            y = x * 2
        z = y.sum()
        z.item()
    sections = counter.report().by_section()
    assert sections["a"] == {"bytes": 64 * 4, "launches": 1}
    assert sections["other"] == {"bytes": 4, "launches": 1}
    assert counter.report().host_syncs == 1


def test_traffic_labels_each_steps_backward(device):
    """label_backward: a chain of two labelled steps; each step's backward ops are counted under
    its own label, what runs around them under the outer one; the values pass through."""
    x = torch.randn(64, device=device, requires_grad=True)
    with TrafficCounter() as counter:
        y_in = counter.label_backward(x, "rest")
        with counter.section("a"):
            y = y_in * 2
        y = counter.label_backward(y, "a (backward)")
        z_in, k = counter.label_backward((y, 5), "rest")  # non-tensors pass through
        with counter.section("b"):
            z = z_in * z_in
        z = counter.label_backward(z, "b (backward)")
        with counter.section("rest"):
            z.sum().backward()
    sections = counter.report().by_section()
    nbytes = 64 * 4
    assert k == 5
    assert sections["b (backward)"] == {"bytes": 3 * nbytes, "launches": 3}  # two products and their sum
    assert sections["a (backward)"] == {"bytes": nbytes, "launches": 1}
    assert sections["rest"]["launches"] == 2  # the sum and the initial ones_like gradient
    torch.testing.assert_close(x.grad, 8 * x.detach())


def test_traffic_counts_triton_launches(device):
    from triton.runtime.jit import JITFunction

    x = torch.randn(100, device=device)

    def run():
        return _double(x, torch.empty_like(x))

    report = count_traffic(run)
    assert [(o.op, o.calls, o.launches, o.bytes) for o in report.ops] == [
        ("triton:_double_kernel", 1, 1, x.numel() * x.element_size())
    ]
    torch.testing.assert_close(run(), 2 * x)
    with triton_launches() as tally:
        run()
        run()
    assert dict(tally.counts) == {"_double_kernel": 2}
    for cls in (JITFunction, type(_double_kernel)):  # the patch is gone afterwards
        assert not getattr(cls.run, "_maxvit_fast_traffic", False)


def test_traffic_dry_run_records_without_executing(device):
    x = torch.randn(50, device=device)
    existing = torch.zeros_like(x)
    report = count_traffic(lambda: _double(x, existing), execute_triton=False)
    assert report.triton_launches == 1
    assert report.bytes == 0  # it writes a tensor that existed before: no fresh allocation charged
    assert torch.count_nonzero(existing) == 0  # not executed


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------


def test_presets():
    expected = {"tiny": (64, (2, 2, 5, 2)), "small": (96, (2, 2, 5, 2)),
                "base": (96, (2, 6, 14, 2)), "large": (128, (2, 6, 14, 2))}
    assert set(PRESETS) == set(VARIANTS) == set(expected)
    for name, (dim, depth) in expected.items():
        kw = preset_kwargs(name)
        assert (kw["dim"], kw["depth"], kw["dim_conv_stem"]) == (dim, depth, dim)
        assert (kw["num_classes"], kw["window_size"], kw["num_register_tokens"], kw["dim_head"]) == (1000, 7, 4, 32)
    model = maxvit_tiny(num_classes=10, fused=True, depth=(1, 1))
    assert model.fused and model.mlp_head[-1].out_features == 10 and model.conv_stem[0].out_channels == 64
    assert preset_kwargs("tiny", dim=32)["dim_conv_stem"] == 32
    with pytest.raises(ValueError, match="unknown preset"):
        preset_kwargs("huge")


# ------------------------------------------------------------------------------------------------
# The CLI
# ------------------------------------------------------------------------------------------------


def test_cli_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = [*SMALL, "--dtype", "fp32", "--batch-sizes", "1,2", "--paths", "eager,fused", "--warmup", "1", "--iters", "1",
            "--repeats", "2", "--json", str(out), "--plot", str(png)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "reference (eager)" in printed
    doc = json.loads(out.read_text())
    assert doc["schema"] == "maxvit-bench/1"
    assert doc["argv"] == argv and doc["command"].startswith("maxvit-bench ")
    datetime.datetime.fromisoformat(doc["date"])
    assert doc["device"]["name"] and doc["device"]["type"] == ("cuda" if HAS_CUDA else "cpu")
    assert doc["versions"]["torch"] == torch.__version__ and doc["versions"]["triton"] == triton.__version__
    cfg = doc["config"]
    assert cfg["batch_sizes"] == [1, 2] and cfg["repeats"] == 2 and cfg["mode"] == "inference"
    assert cfg["model"]["depth"] == [1, 1] and cfg["model"]["dim"] == 64
    eager = {r["batch_size"]: r for r in doc["results"] if r["path"] == "eager"}
    assert set(eager) == {1, 2}
    for batch, r in eager.items():
        assert r["status"] == "ok" and len(r["seconds_per_call_repeats"]) == 2
        assert r["images_per_s"] == pytest.approx(batch / r["seconds_per_call_median"])
        assert r["speedup_vs_eager"] == pytest.approx(1.0)
    fused = [r for r in doc["results"] if r["path"] == "fused"]
    if HAS_CUDA:
        assert all(r["status"] == "ok" and r["relative_error_vs_eager"] < 1e-2 for r in fused)
    else:
        assert len(fused) == 1 and fused[0]["status"] == "skipped" and "CUDA" in fused[0]["note"]
        assert any("CUDA" in n for n in doc["notes"])
    assert not any(r["path"] == "compile" for r in doc["results"])  # not asked for
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_train_step(tmp_path):
    out = tmp_path / "train.json"
    argv = [*SMALL, "--train", "--batch-sizes", "2", "--paths", "eager", "--warmup", "0", "--iters", "1",
            "--repeats", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["mode"] == "train"
    assert [r["status"] for r in doc["results"]] == ["ok"]


def test_cli_traffic(tmp_path, capsys):
    out = tmp_path / "traffic.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bench.main([*SMALL, "--traffic", "--batch-sizes", "2", "--json", str(out)]) == 0
    assert "fused / reference" in capsys.readouterr().out
    t = json.loads(out.read_text())["traffic"]
    ref, fused = t["paths"]["reference"], t["paths"]["fused"]
    for entry in (ref, fused):
        assert entry["bytes_per_image"] > 0 and entry["launches_per_forward"] > 0
        assert sum(s["bytes"] for s in entry["by_section"].values()) == pytest.approx(entry["bytes_per_image"])
        assert sum(o["launches"] for o in entry["by_op"]) == entry["launches_per_forward"]
        assert {"MBConv", "block attention", "grid attention", "block feed-forward", "grid feed-forward"} <= set(entry["by_section"])
    assert ref["triton_launches"] == 0
    assert fused["triton_launches"] > 0, fused["fallbacks"]  # the kernels ran (or were recorded in a dry run)
    assert t["triton_dry_run"] == (not HAS_CUDA)
    assert t["ratio"]["bytes"] == pytest.approx(fused["bytes_per_image"] / ref["bytes_per_image"])
    assert t["target_met"]["bytes"] == (t["ratio"]["bytes"] <= 0.25)


def test_cli_traffic_training_step(tmp_path, capsys):
    """--traffic --train counts a forward + backward per path, each op's backward under its own
    "<section> (backward)" label."""
    out = tmp_path / "traffic-train.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bench.main([*SMALL, "--traffic", "--train", "--batch-sizes", "2", "--json", str(out)]) == 0
    assert "training step (forward + backward)" in capsys.readouterr().out
    t = json.loads(out.read_text())["traffic"]
    assert t["mode"] == "train"
    for entry in t["paths"].values():
        for name in ("MBConv", "block attention", "grid attention", "block feed-forward", "grid feed-forward",
                     "stem, head, register mean"):
            backward = entry["by_section"][f"{name} (backward)"]
            assert backward["launches"] > 0 and backward["bytes"] > 0, name
        assert sum(s["bytes"] for s in entry["by_section"].values()) == pytest.approx(entry["bytes_per_image"])
    assert any(o["op"].startswith("triton:window_attention_bwd") for o in t["paths"]["fused"]["by_op"])


@pytest.mark.skipif(HAS_CUDA, reason="--interpret is the CPU correctness check")
def test_cli_interpret_check(tmp_path, capsys):
    out = tmp_path / "interp.json"
    argv = [*SMALL, "--paths", "eager", "--warmup", "0", "--iters", "1", "--repeats", "1", "--interpret", "--json", str(out)]
    assert bench.main(argv) == 0
    check = json.loads(out.read_text())["interpret_check"]
    assert check["status"] == "ok", check
    assert check["triton_launches"] > 0 and check["relative_error"] <= check["tolerance"]
    assert "correctness check only" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--image-size", "100"], "nearest valid sizes: " + ", ".join(map(str, nearest_valid_sizes(100, 4, 7)))),
        (["--batch-sizes", "0"], "--batch-sizes must be positive integers, got 0"),
        (["--batch-sizes", "2,x"], "--batch-sizes must be positive integers, got 'x'"),
        (["--iters", "0"], "expected a positive integer, got 0"),
        (["--paths", "eager,warp"], "unknown path(s) ['warp']"),
        (["--depth", "1,1", "--image-size", "64"], "nearest valid sizes: " + ", ".join(map(str, nearest_valid_sizes(64, 2, 7)))),
    ],
)
def test_cli_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_entry_point_exit_status():
    proc = subprocess.run([sys.executable, "-m", "maxvit_fast.bench", "--preset", "huge"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "invalid choice: 'huge'" in proc.stderr and "usage: maxvit-bench" in proc.stderr


def test_summarize_reads_cli_output(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import summarize
    finally:
        sys.path.pop(0)
    folder = tmp_path / "run"
    folder.mkdir()
    argv = [*SMALL, "--batch-sizes", "1", "--paths", "eager", "--warmup", "0", "--iters", "1", "--repeats", "1",
            "--json", str(folder / "bench-a.json")]
    assert bench.main(argv) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bench.main([*SMALL, "--traffic", "--json", str(folder / "traffic-a.json")]) == 0
    assert summarize.main([str(folder)]) == 0
    text = (folder / "summary.md").read_text()
    assert "| reference (eager) | 1 |" in text and "Fused/reference: bytes" in text


# ------------------------------------------------------------------------------------------------
# The benchmark peers compute the reference function
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["block", "grid"])
def test_attention_peers_match_reference(pattern, device):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import kernel_cases as kc
    finally:
        sys.path.pop(0)
    from maxvit_fast import ops
    from maxvit_fast.reference import Attention

    attn = Attention(64, dim_head=32, window_size=7, num_registers=4).to(device).eval()
    with torch.no_grad():
        attn.rel_pos_bias.weight.normal_()
    x = torch.randn(2, 14, 21, 64, device=device)
    registers = torch.randn(4, 64, device=device) if pattern == "block" else torch.randn(2, 4, 64, device=device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ops.window_attention_residual(x, registers, attn, pattern, False)
        peers = [kc.sdpa_window_attention(x, registers, attn, pattern),
                 kc.make_flex_window_attention(compiled=False)(x, registers, attn, pattern)]
    for out, regs in peers:
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(regs, expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["conv1x1_expand", "conv1x1_expand_stats", "conv1x1_project", "conv1x1_project_stats"])
def test_conv1x1_cases_compute_the_same_function(op, device):
    """The 1x1-conv benchmark cases (Triton kernel vs cuBLAS + epilogue): the fused case and the
    torch peer agree on the output and, for the "stats" roles, on the per-channel mean (from the
    kernel's per-tile sums); stage 4 shapes (7x7, width 512), batch 1, fp32."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import kernel_cases as kc
    finally:
        sys.path.pop(0)
    assert kc.OP_DIRECTIONS[op] == ("fwd",) and all(s.direction == "fwd" for s in kc.all_specs([op]))
    built = {impl: kc.build_case(kc.CaseSpec(op, 3, impl, "fwd"), 1, torch.float32, device)
             for impl in ("fused", "reference")}
    fused, reference = built["fused"].fn(), built["reference"].fn()
    assert kc.relative_error(kc._first(fused), kc._first(reference)) <= 1e-5
    if op.endswith("stats"):
        _, tile_sum, _ = fused
        y, mean, _ = reference
        torch.testing.assert_close(tile_sum.sum(0) / y.flatten(0, 1).shape[0], mean, rtol=1e-5, atol=1e-5)
    assert built["fused"].ideal_bytes > 0 and built["fused"].flops == built["reference"].flops
