"""torch.library registration, torch.compile and CUDA-graph readiness of the fused ops.

On the CPU the kernels run through the Triton interpreter. torch.compile traces the model with
fake tensors (the custom ops' fake implementations) and then runs the real custom ops, i.e. the
interpreter, inside the compiled graph. The compile tests use ``backend="aot_eager"`` (Dynamo +
AOTAutograd, the graph run by eager aten ops): it exercises everything that decides graph breaks
and the custom ops' autograd, without inductor's C++ build time; one eval test also runs
inductor where a C++ compiler exists.

- every custom op passes ``torch.library.opcheck`` (schema, fake tensors, autograd
  registration, AOT dispatch);
- ``torch.compile(MaxViT(fused=True), fullgraph=True)`` matches the eager fused model in eval
  mode, in train mode with dropout 0 (output, gradients, BatchNorm running statistics) and in
  train mode with dropout (same seed -> same result as eager);
- a compiled model never serves stale folded BatchNorm weights;
- the fused forward (eval, and train with dropout 0) makes no host synchronisation and no
  device-to-host copy (what CUDA-graph capture forbids), its custom ops included;
- on a GPU (``gpu`` marker): the fused eval forward captured in a CUDA graph and replayed on
  new input equals the eager forward.
"""

from __future__ import annotations

import copy
import functools
import importlib
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from maxvit_fast import MaxViT
ff_op = importlib.import_module("maxvit_fast.ops.feedforward")
mbconv_op = importlib.import_module("maxvit_fast.ops.mbconv")  # (the package exports a function of that name)
wa_op = importlib.import_module("maxvit_fast.ops.window_attention")
ln_op = importlib.import_module("maxvit_fast.ops.layernorm_linear")
op_op = importlib.import_module("maxvit_fast.ops.output_projection")
from maxvit_fast.ops.library import custom_op, registry, see_inside
from maxvit_fast.reference import Attention, MBConv

from .conftest import DEVICE
from .helpers import assert_close_normwise

FP32_RTOL = 1e-5  # fp32: same ops in both runs, only summation order may differ


@pytest.fixture(autouse=True)
def fresh_dynamo(request):
    if DEVICE != "cpu" and "gpu" not in request.keywords:
        pytest.skip("CPU (Triton interpreter) test; on a GPU the CUDA-graph test below covers capture")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def seed_tensor():
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=DEVICE)


# ----------------------------------------------------------------------------------------------
# opcheck on every custom op
# ----------------------------------------------------------------------------------------------

def feedforward_cases():
    C = 16
    x = torch.randn(2, 3, 5, C, requires_grad=True)
    weights = [torch.randn(C) * 0.5 + 1, torch.randn(C) * 0.1, torch.randn(4 * C, C) / C**0.5,
               torch.randn(4 * C) * 0.1, torch.randn(C, 4 * C) / (2 * C**0.5), torch.randn(C) * 0.1]
    weights = [w.requires_grad_() for w in weights]
    # the second row set: register rows (B, nX, nY, r, C) sliced out of window sequences
    regs = torch.randn(2, 1, 2, 5, C)[:, :, :, 2:].requires_grad_()
    for p_hidden, p_out, seed, extra in ((0.0, 0.0, None, None), (0.25, 0.1, seed_tensor(), regs)):
        yield ff_op.feedforward_residual_op, (x, extra, *weights, 1e-5, p_hidden, p_out, seed)  # two-kernel backward
        yield ff_op.feedforward_residual_op, (x, extra, *weights, 1e-5, p_hidden, p_out, seed, True)  # backward kernel
        with torch.no_grad():
            *_, stats = ff_op.feedforward_residual_op(x, extra, *weights, 1e-5, p_hidden, p_out, seed, True)
        ln_w, ln_b, w1, b1, w2, _ = (w.detach() for w in weights)
        set2 = (None, None) if extra is None else (extra.detach(), torch.randn_like(extra))
        yield ff_op.feedforward_residual_backward_op, (x.detach(), torch.randn_like(x), *set2, stats, ln_w, ln_b, w1,
                                                       b1, w2, p_hidden, p_out, seed)
        tokens = 30 + (0 if extra is None else extra.numel() // C)
        yield ff_op.feedforward_hidden_backward_op, (x.detach(), torch.randn(tokens, C), set2[0], ln_w, ln_b, w1, b1, w2,
                                                     1e-5, p_hidden, seed)
    yield ff_op.dropout_keep_mask_op, (x.detach(), 4 * C, 0.3, seed_tensor(), 0)
    yield ff_op.dropout_keep_mask_op, (x.detach(), C, 0.3, seed_tensor(), 1, 12)


def window_attention_cases():
    heads, head_dim, window, r = 2, 16, 2, 2
    C = heads * head_dim
    attn = Attention(C, dim_head=head_dim, window_size=window, num_registers=r)
    B, H, W = 2, 4, 4  # 2 x 2 windows per image
    for pattern, register_queries, p, seed in (("block", True, 0.0, None), ("grid", False, 0.3, seed_tensor())):
        qkv = torch.randn(B, H, W, 3 * C, requires_grad=True)
        reg_qkv = torch.randn(1 if register_queries else B, r, (3 if register_queries else 2) * C,
                              requires_grad=True)
        table = torch.randn(attn.rel_pos_bias.weight.shape, requires_grad=True)
        config = (window, r, heads, head_dim, pattern == "grid", register_queries, head_dim**-0.5, p, seed)
        yield wa_op.window_attention_core_op, (qkv, reg_qkv, table, *config)
        with torch.no_grad():
            _, _, lse = wa_op.window_attention_core_op(qkv, reg_qkv, table, *config)
        d_reg_out = torch.randn(B, H // window, W // window, r, C) if register_queries else None
        yield wa_op.window_attention_core_backward_op, (
            qkv.detach(), reg_qkv.detach(), table.detach(), lse, torch.randn(B, H, W, C), d_reg_out, *config,
        )


def randomize_batchnorm_(module):
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
                bn.running_mean.normal_(0, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
    return module


def mbconv_cases():
    for dim_in, dim_out, downsample in ((8, 8, False), (8, 16, True)):
        module = randomize_batchnorm_(MBConv(dim_in, dim_out, downsample=downsample))
        parts = mbconv_op._split(module)
        stride, add_residual = parts.stride, parts.residual
        eps = [float(bn.eps) for bn in parts.bns]
        params = [t.detach().clone().requires_grad_() for t in parts.params()]
        x = torch.randn(2, dim_in, 5, 6, requires_grad=True)
        module.eval()
        w = mbconv_op._fold_eval_weights(parts)
        folded = [getattr(w, name) for name in w.__dataclass_fields__]
        bn_stats = [t.clone() for bn in parts.bns for t in (bn.running_mean, bn.running_var)]
        running = [t.clone() for t in bn_stats]
        yield mbconv_op.mbconv_eval_op, (x, params, bn_stats, folded, eps, stride, add_residual)
        # train mode; frozen statistics (the eval backward's recompute: no autograd of its own)
        for batch_statistics in (True, False):
            args = (running, eps, 0.1, stride, add_residual, True, batch_statistics)
            if batch_statistics:
                yield mbconv_op.mbconv_train_op, (x, params) + args
            else:
                yield mbconv_op.mbconv_train_op, (x.detach(), [p.detach() for p in params]) + args
            with torch.no_grad():  # a backward op: its inputs never require grad
                out, stats, saved, _ = mbconv_op.mbconv_train_op(x, params, *args)
            yield mbconv_op.mbconv_train_backward_op, (torch.randn_like(out), x.detach(),
                                                        [p.detach() for p in params], stats, saved, eps, stride,
                                                        add_residual, batch_statistics)


def layernorm_linear_cases():
    C, r = 16, 3
    x_strided = torch.randn(2, C, 3, 5).permute(0, 2, 3, 1).requires_grad_()  # the NCHW map's view
    x = torch.randn(2, 3, 5, C, requires_grad=True)
    ln_w, ln_b = (torch.randn(C) * 0.2 + 1).requires_grad_(), (torch.randn(C) * 0.2).requires_grad_()
    w, b = (torch.randn(3 * C, C) / C**0.5).requires_grad_(), (torch.randn(3 * C) * 0.1).requires_grad_()
    shared, per_image = torch.randn(1, r, C, requires_grad=True), torch.randn(2, r, C, requires_grad=True)
    yield ln_op.layernorm_linear_op, (x_strided, shared, ln_w, ln_b, w, None, 1e-5, 0)  # block step
    yield ln_op.layernorm_linear_op, (x, per_image, ln_w, ln_b, w, b, 1e-5, C)  # grid step: k/v columns
    yield ln_op.layernorm_linear_op, (x, None, ln_w, None, w, None, 1e-5, 0)  # no extra rows
    # training: the residual-gradient carrier output
    yield ln_op.layernorm_linear_op, (x_strided, shared, ln_w, ln_b, w, None, 1e-5, 0, True)
    rows, regs = torch.randn(30, C), torch.randn(6, C)  # the backward's LayerNorm op (no autograd)
    yield ln_op.layernorm_backward_op, (rows, torch.randn(30, C), torch.randn(30, C), regs, torch.randn(6, C), None,
                                        ln_w.detach(), ln_b.detach(), 1e-5, True)
    yield ln_op.layernorm_backward_op, (rows, torch.randn(30, C), None, None, None, None, None, None, 1e-5, False)


def output_projection_cases():
    C = 16
    weight = (torch.randn(C, C) / C**0.5).requires_grad_()
    a = torch.randn(2, 3, 5, C, requires_grad=True)
    residual = torch.randn(2, C, 3, 5).permute(0, 2, 3, 1).requires_grad_()  # strided tokens
    yield op_op.linear_dropout_residual_op, (a, weight, residual, 0.3, seed_tensor(), 1)  # grid step: tokens
    regs = torch.randn(1, 1, 1, 2, C, requires_grad=True)  # shared register rows, expanded (stride 0)
    a_regs = torch.randn(2, 2, 3, 2, C, requires_grad=True)
    yield op_op.linear_dropout_residual_op, (a, weight, residual, 0.3, seed_tensor(), 1, a_regs,
                                             regs.expand(2, 2, 3, 2, C))  # block step: both row sets
    yield op_op.dropout_grad_op, (torch.randn(2, 3, 5, C), 0.3, seed_tensor(), 1)
    yield op_op.dropout_grad_op, (torch.randn(2, 3, 5, C), 0.3, seed_tensor(), 1, torch.randn(2, 2, 3, 2, C))


CASE_GROUPS = {"feedforward": (feedforward_cases, 10), "window_attention": (window_attention_cases, 4),
               "mbconv": (mbconv_cases, 10), "layernorm_linear": (layernorm_linear_cases, 6),
               "output_projection": (output_projection_cases, 4)}


@functools.cache
def opcheck_cases(group):
    cases = list(CASE_GROUPS[group][0]())
    assert len(cases) == CASE_GROUPS[group][1]
    return cases


def test_every_custom_op_has_opcheck_cases():
    ops = {op._qualname for group in CASE_GROUPS for op, _ in opcheck_cases(group)}
    assert ops == {name for name in registry if not name.startswith("maxvit_fast::test_")}


@pytest.mark.parametrize("group, index", [(g, i) for g, (_, n) in CASE_GROUPS.items() for i in range(n)])
def test_opcheck(group, index):
    op, args = opcheck_cases(group)[index]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------
# torch.compile of the fused model
# ----------------------------------------------------------------------------------------------

SMALL = dict(num_classes=5, dim=32, depth=(1,), dim_head=16, window_size=2, num_register_tokens=2)


def small_model(dropout=0.0):
    model = MaxViT(**SMALL, dropout=dropout, fused=True)
    randomize_batchnorm_(model)
    return model


def image():
    return torch.randn(2, 3, 16, 16)  # stage map 4x4: 2x2 windows


def compiled(model, backend="aot_eager"):
    return torch.compile(model, fullgraph=True, backend=backend)


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                                       reason="inductor on the CPU needs a C++ compiler")),
])
def test_compile_eval_fullgraph_matches_eager(backend):
    model = small_model().eval()
    x = image()
    with torch.no_grad():
        eager = model(x)
        out = compiled(model, backend)(x)
        model.fused = False
        reference = model(x)
    assert_close_normwise(out, eager, FP32_RTOL, name="compiled vs eager fused")
    assert_close_normwise(out, reference, 1e-4, name="compiled fused vs reference")  # kernels' own fp32 error


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def train_step(model, x, grad_out, seed):
    torch.manual_seed(seed)
    out = model(x)
    out.backward(grad_out)
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compile_train_fullgraph_matches_eager(dropout):
    """Train mode: output, every parameter gradient and the BatchNorm running statistics of the
    compiled model equal the eager fused model's; with dropout, for the same torch.manual_seed
    (the in-kernel dropout seeds are drawn from torch's default generator inside the graph)."""
    model = small_model(dropout).train()
    twin = copy.deepcopy(model)
    x, seed = image(), torch.seed()
    grad_out = torch.randn(2, SMALL["num_classes"])
    eager = train_step(model, x, grad_out, seed)
    out = train_step(compiled(twin), x, grad_out, seed)
    assert_close_normwise(out, eager, FP32_RTOL, name="output")
    for name, g in grads(model).items():
        assert g is not None and grads(twin)[name] is not None, name
        assert_close_normwise(grads(twin)[name], g, 1e-4, name=f"grad {name}")  # fp32, longer sums
    for name, buf in model.named_buffers():
        assert_close_normwise(dict(twin.named_buffers())[name].float(), buf.float(), FP32_RTOL, name=name)


def test_compile_eval_gradients_match_eager():
    """Eval mode with gradients (frozen BatchNorm; the MBConv backward recomputes the block with
    the train kernels inside the compiled backward): input and parameter gradients of the
    compiled model equal the eager fused model's."""
    model = small_model().eval()
    twin = copy.deepcopy(model)
    x = image().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    grad_out = torch.randn(2, SMALL["num_classes"])
    model(x).backward(grad_out)
    compiled(twin)(x2).backward(grad_out)
    assert_close_normwise(x2.grad, x.grad, 1e-4, name="grad x")
    for name, g in grads(model).items():
        assert g is not None and grads(twin)[name] is not None, name
        assert_close_normwise(grads(twin)[name], g, 1e-4, name=f"grad {name}")
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))


def test_compile_train_dropout_changes_with_the_seed():
    model = small_model(0.3).train()
    fn, x = compiled(model), image()
    torch.manual_seed(1)
    a = fn(x)
    torch.manual_seed(2)
    b = fn(x)
    assert (a - b).abs().max() > 1e-3


def test_compiled_model_never_serves_stale_folded_batchnorm():
    model = small_model().eval()
    fn, x = compiled(model), image()
    with torch.no_grad():
        fn(x)
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_var.mul_(1.7)
            bn.weight.add_(0.3)
        out = fn(x)
        eager = model(x)
    assert_close_normwise(out, eager, FP32_RTOL, name="output after a BatchNorm update")


# ----------------------------------------------------------------------------------------------
# CUDA-graph readiness: no host synchronisation in the fused forward
# ----------------------------------------------------------------------------------------------

@see_inside  # also look inside the maxvit_fast custom ops
class HostSyncDetector(TorchDispatchMode):
    """Records every op that reads device values on the host (``.item()``, ``bool(tensor)``,
    ``nonzero``-style data-dependent shapes) or copies a tensor to the CPU."""

    SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
             "aten::masked_select", "aten::unique", "aten::_unique2"}

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.syncs: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.ops += 1
        if name in self.SYNCS:
            self.syncs.append(name)
        if name in ("aten::_to_copy", "aten::copy_") and self.device.type != "cpu":
            src = args[1] if name == "aten::copy_" else args[0]
            dst = args[0].device if name == "aten::copy_" else kwargs.get("device", src.device)
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self.syncs.append(f"{name} to cpu")
        return func(*args, **kwargs)


@custom_op("test_host_read_probe")
def host_read_probe(x: torch.Tensor) -> torch.Tensor:
    """A custom op that reads a value on the host, as a fused op must not."""
    return x * x.sum().item()


def test_host_sync_detector_sees_item_inside_custom_ops():
    with HostSyncDetector("cpu") as mode:
        host_read_probe(torch.randn(3))
    assert mode.syncs and set(mode.syncs) <= HostSyncDetector.SYNCS


@pytest.mark.parametrize("mode,dropout", [("eval", 0.0), ("train", 0.0), ("train", 0.1)])
def test_fused_forward_makes_no_host_sync(mode, dropout):
    """No .item()/.cpu()/data-dependent shape in the fused forward, custom ops included; in
    training with dropout the seeds are drawn and read on the device."""
    model = small_model(dropout).train(mode == "train")
    x = image()
    with torch.no_grad(), HostSyncDetector(DEVICE) as detector:
        model(x)
    assert detector.ops > 100  # the mode saw the model's ops, those inside the custom ops too
    assert detector.syncs == []


def test_fused_training_step_makes_no_host_sync():
    """Forward and backward of a training step with dropout (the custom ops' backward kernels and
    torch recomputes included) read nothing on the host: a captured CUDA graph can hold it."""
    model = small_model(0.1).train()
    x = image()
    with HostSyncDetector(DEVICE) as detector:
        model(x).square().sum().backward()
    assert detector.ops > 200
    assert detector.syncs == []


@pytest.mark.gpu
def test_cuda_graph_capture_of_fused_eval_forward():
    model = small_model().to(DEVICE).eval()
    static_x = image().to(DEVICE)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, folded weights cached
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        fresh = torch.randn_like(static_x)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        expected = model(fresh)
    assert_close_normwise(static_out, expected, FP32_RTOL, name="replayed CUDA graph vs eager")


@pytest.mark.gpu
def test_cuda_graph_replays_draw_fresh_dropout_masks():
    """A captured training forward + backward with dropout: every replay draws new seeds on the
    device (the kernels read them there), so two replays on the same input give different
    outputs, and a replay matches an eager step run from the same generator state."""
    model = small_model(dropout=0.3).to(DEVICE).train()
    static_x = image().to(DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles)
        for _ in range(2):
            model(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        static_out.sum().backward()
    graph.replay()
    first = static_out.clone()
    graph.replay()
    second = static_out.clone()
    torch.cuda.synchronize()
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first, second), "two replays reused the same dropout masks"
