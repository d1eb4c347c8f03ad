"""Benchmark cases: each fused operation against its peers at MaxViT-T shapes, per stage.

Shared by the pytest-benchmark suite (``test_kernels.py``) and the plain runner
(``run_kernels.py``, used by ``gpu_run.sh`` where pytest-benchmark may be missing).

Every case goes through the op functions of ``maxvit_fast.ops`` (``fused=True`` for the fused
implementation, ``fused=False`` for the reference), so kernels are picked up as they land. The
peers compute the same function:

window attention (block and grid step, residual included)
  fused       ops.window_attention_residual(..., fused=True)
  reference   the same op with fused=False (the reference Attention over materialised windows)
  sdpa        window partition + registers concatenated, LayerNorm + qkv, then
              F.scaled_dot_product_attention with the (heads, n, n) bias materialised per call
  flex        the same with torch.compile(flex_attention) and a score_mod that gathers the bias
MBConv (first block of the stage: stride 2; and a repeated block: residual)
  fused, reference, compile (torch.compile of the reference module)
feed-forward + residual
  fused, reference, compile
1x1 convs of the MBConv (stride-1 blocks' shapes; forward only: issue 4's "Triton matmul vs
cuBLAS + a fused epilogue, per shape"), each role as the fused MBConv runs it:
  conv1x1_expand        eval expand conv: gelu(x W + b), BatchNorm folded into W, b
  conv1x1_expand_stats  train expand conv: x W + b and per-channel batch statistics
  conv1x1_project       eval project conv: (gate * h) W * s + t + residual
  conv1x1_project_stats train project conv: (gate * h) W + b and per-channel batch statistics
  fused       kernels/pointwise_conv.py (one launch; "stats": per-tile sums the BatchNorm
              statistics kernel merges)
  reference   cuBLAS (torch.addmm) and the epilogue as eager torch ops
  compile     torch.compile of the same: cuBLAS with Inductor's fused epilogue kernel(s)

Directions: ``fwd`` (eval mode, no grad) and ``fwd+bwd`` (train mode, gradients of the input
and every parameter). Dropout is 0 in every case so that peers without dropout (flex) compute
the same function; ``maxvit-bench --train`` measures the model with its dropout.

``ideal_bytes`` is the traffic of a perfectly fused op (read its inputs and parameters once,
write its outputs once; for fwd+bwd add reading the output gradient and the input again and
writing the input and parameter gradients). Achieved GB/s = ideal_bytes / time: how close the op
is to the copy roofline, whatever it does internally.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from maxvit_fast import ops
from maxvit_fast.reference import MBConv, Attention, FeedForward

# MaxViT-T at 224x224: (feature-map side, width) per stage; the stem is 64 wide at 112x112.
STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]
STEM_WIDTH = 64
WINDOW, REGISTERS, DIM_HEAD = 7, 4, 32

IMPLS = {
    "window_attention_block": ("fused", "reference", "sdpa", "flex"),
    "window_attention_grid": ("fused", "reference", "sdpa", "flex"),
    "mbconv_first": ("fused", "reference", "compile"),
    "mbconv": ("fused", "reference", "compile"),
    "feedforward": ("fused", "reference", "compile"),
    "conv1x1_expand": ("fused", "reference", "compile"),
    "conv1x1_expand_stats": ("fused", "reference", "compile"),
    "conv1x1_project": ("fused", "reference", "compile"),
    "conv1x1_project_stats": ("fused", "reference", "compile"),
}
DIRECTIONS = ("fwd", "fwd+bwd")
# ops timed in the forward only (default: DIRECTIONS)
OP_DIRECTIONS = {op: ("fwd",) for op in IMPLS if op.startswith("conv1x1")}
# Sanity gate before timing a peer: normwise relative error of its forward vs the reference.
AGREEMENT = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def default_batch() -> int:
    return int(os.environ.get("MAXVIT_BENCH_BATCH", "32"))


def default_dtype() -> torch.dtype:
    name = os.environ.get("MAXVIT_BENCH_DTYPE", "bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    op: str
    stage: int
    impl: str
    direction: str

    @property
    def id(self) -> str:
        return f"{self.op}-stage{self.stage + 1}-{self.impl}-{self.direction}"


def all_specs(ops_filter=None, stages=(0, 1, 2, 3), directions=DIRECTIONS, impls=None) -> list[CaseSpec]:
    specs = []
    for op, op_impls in IMPLS.items():
        if ops_filter and op not in ops_filter:
            continue
        for stage in stages:
            for direction in (d for d in directions if d in OP_DIRECTIONS.get(op, DIRECTIONS)):
                for impl in op_impls:
                    if impls is None or impl in impls:
                        specs.append(CaseSpec(op, stage, impl, direction))
    return specs


@dataclasses.dataclass
class Built:
    fn: object  # zero-argument callable: one call of the op (forward, or forward + backward)
    forward: object  # zero-argument callable returning the forward output (for the agreement check)
    reference_forward: object
    ideal_bytes: int
    flops: int
    shape: str


# ------------------------------------------------------------------------------------------------
# Peers of window attention
# ------------------------------------------------------------------------------------------------


def _windows_with_registers(x, registers, attn: Attention, pattern: str):
    """(B*nX*nY, r + w*w, C) sequences, as the reference builds them."""
    w, r = attn.window_size, attn.num_registers
    b, _, _, c = x.shape
    tokens = ops.window_partition(x, w, pattern)
    nx, ny = tokens.shape[1:3]
    regs = registers.expand(b, nx, ny, r, c) if registers.ndim == 2 else registers[:, None, None].expand(b, nx, ny, r, c)
    return torch.cat([regs, tokens], dim=3).reshape(b * nx * ny, r + w * w, c), (b, nx, ny)


def _split_heads(seq, attn: Attention):
    n_seq, n, _ = seq.shape
    q, k, v = F.linear(attn.norm(seq), attn.to_qkv.weight).chunk(3, dim=-1)
    return [t.reshape(n_seq, n, attn.heads, attn.dim_head).transpose(1, 2) for t in (q, k, v)]


def _finish(core, seq, attn: Attention, dims, pattern: str):
    b, nx, ny = dims
    w, r = attn.window_size, attn.num_registers
    out = core.transpose(1, 2).reshape(seq.shape)
    seq = F.linear(out, attn.to_out[0].weight) + seq
    seq = seq.reshape(b, nx, ny, r + w * w, -1)
    return ops.window_unpartition(seq[:, :, :, r:], w, pattern), seq[:, :, :, :r]


def sdpa_window_attention(x, registers, attn: Attention, pattern: str):
    """Window attention + residual with F.scaled_dot_product_attention and a materialised bias."""
    seq, dims = _windows_with_registers(x, registers, attn, pattern)
    q, k, v = _split_heads(seq, attn)
    bias = attn.rel_pos_bias(attn.rel_pos_indices).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # (1, h, n, n)
    core = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return _finish(core, seq, attn, dims, pattern)


def make_flex_window_attention(compiled: bool = True):
    """Window attention + residual with FlexAttention; the bias is gathered in a score_mod."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention) if compiled else flex_attention

    def run(x, registers, attn: Attention, pattern: str):
        seq, dims = _windows_with_registers(x, registers, attn, pattern)
        q, k, v = _split_heads(seq, attn)
        table, index = attn.rel_pos_bias.weight, attn.rel_pos_indices

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], h]

        core = flex(q, k, v, score_mod=add_bias, scale=attn.scale)
        return _finish(core, seq, attn, dims, pattern)

    return run


# ------------------------------------------------------------------------------------------------
# Building a case
# ------------------------------------------------------------------------------------------------


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _with_backward(forward, inputs, params, grads_like):
    """fn() = forward, then backward with fixed random output gradients."""
    grads = None

    def fn():
        nonlocal grads
        for t in (*inputs, *params):
            t.grad = None
        outs = forward()
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)

    return fn


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def build_case(spec: CaseSpec, batch: int, dtype: torch.dtype, device, compile_flex: bool = True) -> Built:
    torch.manual_seed(0)
    train = spec.direction == "fwd+bwd"
    side, width = STAGES[spec.stage]
    dev = torch.device(device)

    if spec.op.startswith("window_attention"):
        pattern = "block" if spec.op.endswith("block") else "grid"
        module = Attention(width, dim_head=DIM_HEAD, dropout=0.0, window_size=WINDOW, num_registers=REGISTERS)
        module = module.to(dev, dtype).train(train)
        with torch.no_grad():  # a bias that matters, so a wrong gather shows in the agreement check
            module.rel_pos_bias.weight.normal_()
        x = torch.randn(batch, side, side, width, device=dev, dtype=dtype)
        reg_shape = (REGISTERS, width) if pattern == "block" else (batch, REGISTERS, width)
        registers = torch.randn(*reg_shape, device=dev, dtype=dtype)
        need_regs = pattern == "block"

        def op_call(fused):
            return lambda: ops.window_attention_residual(x, registers, module, pattern, fused, need_register_outputs=need_regs)

        if spec.impl == "fused":
            call = op_call(True)
        elif spec.impl == "reference":
            call = op_call(False)
        elif spec.impl == "sdpa":
            call = lambda: _keep(sdpa_window_attention(x, registers, module, pattern), need_regs)  # noqa: E731
        elif spec.impl == "flex":
            flex = make_flex_window_attention(compile_flex)
            call = lambda: _keep(flex(x, registers, module, pattern), need_regs)  # noqa: E731
        else:
            raise ValueError(spec.impl)
        reference = op_call(False)
        n_windows = batch * (side // WINDOW) ** 2
        n = REGISTERS + WINDOW * WINDOW
        act = _nbytes(x)
        reg_out = n_windows * REGISTERS * width * x.element_size() if need_regs else 0
        fwd_bytes = act + _nbytes(registers) + _param_bytes(module) + act + reg_out
        tokens = n_windows * n
        flops = 2 * tokens * width * 4 * width + 4 * n_windows * n * n * width
        inputs, params = [x, registers], list(module.parameters())
        shape = f"x {tuple(x.shape)}, {pattern} windows {WINDOW}x{WINDOW} + {REGISTERS} registers, heads {module.heads}"
    elif spec.op.startswith("mbconv"):
        first = spec.op == "mbconv_first"
        dim_in = (STEM_WIDTH if spec.stage == 0 else STAGES[spec.stage - 1][1]) if first else width
        in_side = 2 * side if first else side
        module = MBConv(dim_in, width, downsample=first).to(dev, dtype).train(train)
        x = torch.randn(batch, dim_in, in_side, in_side, device=dev, dtype=dtype)
        # each path gets the layout its model feeds it: the fused model keeps activations channels-last
        x_fused = x.contiguous(memory_format=torch.channels_last)
        if spec.impl == "fused":
            x_used = x_fused
            call = lambda: ops.mbconv(x_fused, module, True)  # noqa: E731
        elif spec.impl == "reference":
            x_used = x
            call = lambda: ops.mbconv(x, module, False)  # noqa: E731
        elif spec.impl == "compile":
            x_used = x
            compiled = torch.compile(module)
            call = lambda: compiled(x)  # noqa: E731
        else:
            raise ValueError(spec.impl)
        reference = lambda: ops.mbconv(x, module, False)  # noqa: E731
        hidden = 4 * width
        out_elems = batch * width * side * side
        act = _nbytes(x)
        fwd_bytes = act + out_elems * x.element_size() + _param_bytes(module)
        p_in, p_out = batch * in_side * in_side, batch * side * side
        flops = 2 * p_in * dim_in * hidden + 2 * 9 * p_out * hidden + 2 * p_out * hidden * width
        inputs, params = [x_used], list(module.parameters())
        shape = f"x {tuple(x.shape)} -> ({batch}, {width}, {side}, {side}), hidden {hidden}, stride {2 if first else 1}"
    elif spec.op.startswith("conv1x1"):
        return _build_conv1x1_case(spec, batch, dtype, dev, side, width)
    elif spec.op == "feedforward":
        module = FeedForward(width, dropout=0.0).to(dev, dtype).train(train)
        x = torch.randn(batch, side, side, width, device=dev, dtype=dtype)
        if spec.impl == "fused":
            call = lambda: ops.feedforward_residual(x, module, True)  # noqa: E731
        elif spec.impl == "reference":
            call = lambda: ops.feedforward_residual(x, module, False)  # noqa: E731
        elif spec.impl == "compile":
            compiled = torch.compile(lambda t: module(t) + t)
            call = lambda: compiled(x)  # noqa: E731
        else:
            raise ValueError(spec.impl)
        reference = lambda: ops.feedforward_residual(x, module, False)  # noqa: E731
        act = _nbytes(x)
        fwd_bytes = 2 * act + _param_bytes(module)
        flops = 2 * 2 * (batch * side * side) * width * 4 * width
        inputs, params = [x], list(module.parameters())
        shape = f"tokens {tuple(x.shape)}, hidden {4 * width}"
    else:
        raise ValueError(spec.op)

    if train:
        for t in inputs:
            t.requires_grad_(True)
        fn = _with_backward(call, inputs, params, None)
        # + read the output gradient, read the input again, write input and parameter gradients
        ideal = fwd_bytes + 3 * act + _param_bytes(module)
        flops *= 3
    else:
        def fn():
            with torch.no_grad():
                return call()
        ideal = fwd_bytes

    def forward():
        with torch.no_grad():
            return _first(call())

    def reference_forward():
        with torch.no_grad():
            return _first(reference())

    return Built(fn=fn, forward=forward, reference_forward=reference_forward, ideal_bytes=ideal, flops=flops, shape=shape)


def _conv1x1_torch(role: str):
    """The 1x1 conv role with cuBLAS (addmm) and its epilogue as torch ops (see the header)."""
    def expand(a, w_t, shift):
        return F.gelu(torch.addmm(shift, a.flatten(0, 1), w_t)).view(*a.shape[:2], -1)

    def expand_stats(a, w_t, bias):
        y = torch.addmm(bias, a.flatten(0, 1), w_t)
        var, mean = torch.var_mean(y.float(), dim=0, correction=0)
        return y.view(*a.shape[:2], -1), mean, var

    def project(h, gate, w_t_scaled, shift, residual):
        gated = (h * gate[:, None, :].to(h.dtype)).flatten(0, 1)
        return torch.addmm(shift, gated, w_t_scaled).view(residual.shape) + residual

    def project_stats(h, gate, w_t, bias):
        y = torch.addmm(bias, (h * gate[:, None, :].to(h.dtype)).flatten(0, 1), w_t)
        var, mean = torch.var_mean(y.float(), dim=0, correction=0)
        return y.view(*h.shape[:2], -1), mean, var

    return {"expand": expand, "expand_stats": expand_stats, "project": project, "project_stats": project_stats}[role]


def _build_conv1x1_case(spec: CaseSpec, batch: int, dtype: torch.dtype, dev, side: int, width: int) -> Built:
    from maxvit_fast.kernels.pointwise_conv import pointwise_conv

    role = spec.op[len("conv1x1_"):]
    project = role.startswith("project")
    hidden = 4 * width
    K, N = (hidden, width) if project else (width, hidden)
    P = side * side
    a = torch.randn(batch, P, K, device=dev, dtype=dtype)
    w_t = (torch.randn(K, N, device=dev) / K ** 0.5).to(dtype)
    ones = torch.ones(N, device=dev)
    scale = 0.5 + torch.rand(N, device=dev)  # a folded BatchNorm's per-channel scale (eval project)
    shift = 0.1 * torch.randn(N, device=dev)
    gate = torch.rand(batch, K, device=dev)
    residual = torch.randn(batch, P, N, device=dev, dtype=dtype)
    if role == "expand":
        args = (a, w_t, shift.to(dtype))
        fused = lambda: pointwise_conv(a, w_t, ones, shift, out_gelu=True)  # noqa: E731
    elif role == "expand_stats":
        args = (a, w_t, shift.to(dtype))
        fused = lambda: pointwise_conv(a, w_t, ones, shift.to(dtype), stats=True)  # noqa: E731
    elif role == "project":
        args = (a, gate, (w_t.float() * scale).to(dtype), shift.to(dtype), residual)
        fused = lambda: pointwise_conv(a, w_t, scale, shift, gate=gate, residual=residual)  # noqa: E731
    else:
        args = (a, gate, w_t, shift.to(dtype))
        fused = lambda: pointwise_conv(a, w_t, ones, shift.to(dtype), gate=gate, stats=True)  # noqa: E731
    torch_fn = _conv1x1_torch(role)
    if spec.impl == "fused":
        call = fused
    elif spec.impl == "reference":
        call = lambda: torch_fn(*args)  # noqa: E731
    elif spec.impl == "compile":
        compiled = torch.compile(torch_fn)
        call = lambda: compiled(*args)  # noqa: E731
    else:
        raise ValueError(spec.impl)

    def fn():
        with torch.no_grad():
            return call()

    def forward():
        with torch.no_grad():
            return _first(call())

    def reference_forward():
        with torch.no_grad():
            return _first(torch_fn(*args))

    # compulsory: read the input, the weight (and gate, residual), write the output (the
    # statistics are N-sized per tile or per channel: not counted)
    ideal = _nbytes(a, w_t) + batch * P * N * a.element_size()
    if project:
        ideal += _nbytes(gate) + (_nbytes(residual) if role == "project" else 0)
    shape = f"({batch}, {P}, {K}) x ({K}, {N}), {role.replace('_', ' + ')}"
    return Built(fn=fn, forward=forward, reference_forward=reference_forward, ideal_bytes=ideal,
                 flops=2 * batch * P * K * N, shape=shape)


def _keep(result, need_regs):
    out, regs = result
    return (out, regs) if need_regs else (out, None)


def relative_error(actual, expected) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def check_agreement(built: Built, dtype) -> float:
    """Normwise relative error of the case's forward vs the reference; raises if a peer computes
    something else (it would not be worth timing)."""
    err = relative_error(built.forward(), built.reference_forward())
    if not err <= AGREEMENT[dtype]:
        raise AssertionError(f"forward differs from the reference: relative error {err:.2e} > {AGREEMENT[dtype]:.0e}")
    return err
