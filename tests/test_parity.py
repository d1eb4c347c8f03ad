"""The reference model (fused=False) against vit-pytorch 1.26.11's MaxViT with registers."""

import pytest
import torch

from maxvit_fast import MaxViT

from .helpers import assert_close_l2, assert_close_normwise, randomize_batchnorm_buffers_, load_vit_pytorch_maxvit

peer = load_vit_pytorch_maxvit()
pytestmark = pytest.mark.skipif(peer is None, reason="vit-pytorch is not installed (pip install --no-deps vit-pytorch==1.26.11)")

# (constructor kwargs, image side); each stage's feature map must divide by window_size.
CONFIGS = {
    "default-like": (dict(dim=64, depth=(2, 1), window_size=7), 56),
    "window8": (dict(dim=32, depth=(1, 1), dim_head=16, window_size=8), 64),
    "one-register": (dict(dim=32, depth=(2,), dim_head=16, window_size=4, num_register_tokens=1), 32),
    "six-registers": (dict(dim=32, depth=(1, 2), dim_head=16, window_size=4, num_register_tokens=6), 32),
    "dim_head16": (dict(dim=48, depth=(1, 1), dim_head=16, window_size=4), 32),
    "dim_head64": (dict(dim=64, depth=(1, 1), dim_head=64, window_size=4), 32),
    "one-stage": (dict(dim=32, depth=(3,), dim_head=16, window_size=5), 40),
    "three-stages": (dict(dim=16, depth=(1, 1, 1), dim_head=16, window_size=2), 32),
    "stem-width": (dict(dim=32, depth=(1, 1), dim_head=16, dim_conv_stem=24, window_size=4,
                        mbconv_expansion_rate=2, mbconv_shrinkage_rate=0.5), 32),
}

RTOL = 1e-5  # fp32 on both sides; only summation order differs


def build_pair(kwargs, dropout):
    torch.manual_seed(torch.seed() % 2**31)
    theirs = peer.MaxViT(num_classes=7, dropout=dropout, **kwargs)
    ours = MaxViT(num_classes=7, dropout=dropout, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    # BatchNorm buffers start at 0/1: give them values so eval mode exercises them.
    randomize_batchnorm_buffers_(theirs, mean_std=0.1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_outputs_match_vit_pytorch(name):
    kwargs, size = CONFIGS[name]
    theirs, ours = build_pair(kwargs, dropout=0.1)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_close_normwise(ours(x), theirs(x), RTOL, name="logits")


# Gradients: float64 at 1e-5 relative, where only a formula difference can show; fp32 at 1e-4,
# because the long reductions behind parameter gradients round differently with the memory
# format (our transformer steps hand channels-last tensors to the convolutions).
# The floor (a fraction of the largest parameter-gradient norm) covers gradients that are zero
# in exact arithmetic, e.g. conv biases in front of a train-mode BatchNorm.
@pytest.mark.parametrize(
    "dtype,grad_rtol,floor_frac", [(torch.float64, 1e-5, 1e-3), (torch.float32, 1e-4, 1e-2)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_outputs_and_gradients_match_vit_pytorch(name, dtype, grad_rtol, floor_frac):
    kwargs, size = CONFIGS[name]
    theirs, ours = build_pair(kwargs, dropout=0.0)
    theirs.to(dtype).train(), ours.to(dtype).train()
    x = torch.randn(3, 3, size, size, dtype=dtype)
    target = torch.randn(3, 7, dtype=dtype)
    out_t, out_o = theirs(x), ours(x)
    assert_close_normwise(out_o, out_t, RTOL, name="logits")
    (out_t * target).sum().backward()
    (out_o * target).sum().backward()
    grads_t = {n: p.grad for n, p in theirs.named_parameters()}
    floor = floor_frac * max(g.norm().item() for g in grads_t.values())
    for pname, p in ours.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert_close_l2(p.grad, grads_t[pname], grad_rtol, name=f"grad {pname}", floor=floor)
    # BatchNorm running statistics follow the same updates.
    bufs_t = dict(theirs.named_buffers())
    for bname, b in ours.named_buffers():
        if b.is_floating_point():
            assert_close_normwise(b, bufs_t[bname], RTOL, name=bname)
        else:
            assert torch.equal(b, bufs_t[bname]), bname


def test_state_dict_names_match_exactly():
    theirs = peer.MaxViT(num_classes=5, dim=32, depth=(2, 1), dim_head=16, window_size=4)
    ours = MaxViT(num_classes=5, dim=32, depth=(2, 1), dim_head=16, window_size=4)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    # and the other way round: our checkpoints load into vit-pytorch
    theirs.load_state_dict(ours.state_dict(), strict=True)
