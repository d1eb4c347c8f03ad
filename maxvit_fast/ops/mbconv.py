"""MBConv (with its residual where the block has one) on NCHW tensors of any memory format.

``mbconv(x, module, fused)`` computes ``module(x)`` for the reference MBConv (an nn.Sequential,
or an MBConvResidual wrapping one; see maxvit_fast/reference.py).

Fused path, eval mode (BatchNorm folded). Where recomputing the expand conv is cheaper than
moving h1 (see MAX_RECOMPUTE_FLOP_PER_BYTE below: every stride-2 block of MaxViT-T, no
stride-1 block), 3 kernel launches, the 4x-wide expand output h1 never written:
  1. kernels/expand_depthwise_conv.py  expand 1x1 conv + BN1 + GELU, recomputed in registers for
                                 each of the 9 taps of the 3x3 depthwise conv + BN2 + GELU, and
                                 the per-tile channel sums for the SE mean -> h2 (B, Ho, Wo, hidden)
  2. kernels/squeeze_excitation.py  mean -> Linear -> SiLU -> Linear -> sigmoid, per image -> gate
  3. kernels/pointwise_conv.py   project 1x1 conv on gate * h2 (gate applied to the A tile in
                                 registers) + BN3 (+ residual x)        -> out (B, Ho, Wo, dim_out)
Otherwise 4 launches: kernels/pointwise_conv.py (expand + BN1 + GELU -> h1), then
kernels/depthwise_conv.py (3x3 depthwise + BN2 + GELU with the SE sums -> h2), then 2 and 3.
For MaxViT-T per image the fusion adds 1.3 GFLOP over the 4 stride-2 blocks and saves 11.5 MiB
of h1 writes (bf16); the 7 stride-1 blocks would add 5.8 GFLOP to save 4.0 MiB. No configuration
of either path spills (AOT reports in the kernels' headers). GPU speed: not measured.

Fused path, train mode (BatchNorm with batch statistics: a BN cannot normalise before the
statistics of its whole input exist, so each BN input is written once by the kernel that
produces it, together with per-tile (sum, centred sum of squares); one launch merges those in
fp32 (Chan's formula, kernels/batchnorm_statistics.py) and a BN + activation pass normalises):
  1. pointwise_conv   y1 = conv1(x) + bias, tile statistics              -> BN1 batch statistics
  2. batchnorm_gelu   h1 = gelu(BN1(y1))
  3. depthwise_conv   y2 = dwconv(h1) + bias, tile statistics            -> BN2 batch statistics
  4. batchnorm_gelu   h2 = gelu(BN2(y2)), with the SE sums
  5. squeeze_excitation  gate
  6. pointwise_conv   y3 = conv3(gate * h2) + bias, tile statistics      -> BN3 batch statistics
  7. batchnorm_gelu   out = BN3(y3) (+ x), no activation, one rounding
  When a backward will run, h1 and h2 go to new buffers and y1, h1, y2, h2, y3 (plus the gate,
  the SE sums and the BN scale/shift) are saved: 2 + 2 hidden-wide tensors, where the reference
  keeps about 8 (conv, BN and GELU outputs, the gated tensor). Otherwise (no autograd graph) h1
  and h2 overwrite y1 and y2 in place.
  Running statistics: where the three BNs share one momentum (MaxViT's), the statistics kernels
  also compute the updated running mean/var (fp32 math, one rounding to the buffers' dtype) and
  the caller copies them in with one foreach copy (plus one foreach add for the step counters),
  for any buffer dtype; otherwise (momentum None: a cumulative average) torch ops do it from
  the batch statistics (maxvit_fast/batchnorm.py).
  Eval-mode BN is never used in train mode: the mode comes from the BatchNorm layers' own
  ``training`` flags (mixed flags fall back to the reference).

Backward, train mode (``mbconv_train_backward``, see _train_gradients): per BatchNorm three
Triton launches from kernels/batchnorm_backward.py (per-tile sums, per-channel coefficients and
the gamma/beta gradients, then dy with the GELU derivative, and for BN2 the SE gate and SE-mean
terms, applied on the fly), cuBLAS for the 1x1 convs' matmuls, aten's depthwise convolution
backward (cuDNN on a GPU), and for the SE MLP one launch (kernels/squeeze_excitation.py
se_gate_backward: the SE mean from the forward's tile sums, dL/dgate from column 4 of the BN2
backward sums read in place, sigmoid' and silu' exact, fp32; it writes dm for the BN2 backward
and the vectors of the weight gradients, those in the SE weights' dtype) plus two matmuls for
d W_e and d W_r (in that dtype: no casts). It replaced 14 small torch ops per block
(two sums, two divisions, two fp32 copies of the SE weights, five matmuls, sigmoid_backward,
silu, silu_backward): traffic model (``TRITON_INTERPRET=1 maxvit-bench --traffic --train --dtype
bf16``, MaxViT-T, batch 1, 224) backward 1397 -> 1276 launches (-11 per block x 11 blocks),
293.2 -> 265.8 MiB (the fp32 weight copies, 27.3 MiB); the whole step 1696 -> 1575 launches,
69.5% of the reference's (was 74.9%), bytes 54.9% (was 59.3%). Nothing of the
forward is recomputed but GELU and BN inside the kernels. The conv biases in front of the
train-mode BatchNorms get exact zeros (their gradient is zero: BN subtracts the batch mean;
the reference returns the rounding noise of that cancelling sum). Counted per block (traffic
model, bf16, dim 64, 56x56, batch 1): backward 7.6 MiB written, the recompute-and-vjp backward
it replaces 30.1 MiB, the reference's own autograd 17.7 MiB. (Counted with
``count_traffic(lambda: y.backward(g), execute_triton=False)`` after a fused forward of
``MBConv(64, 64, downsample=False)`` in bf16 on 1x64x56x56, the SE change alone: 42 -> 31
launches, 6.50 -> 6.37 MiB.) Then 30 -> 22 launches (same block, ``zero_grad(set_to_none=True)``
before the backward, as a training loop does): the coefficients kernel stores dgamma / dbeta in
the BatchNorm parameters' dtype (six casts gone in bf16), and the three zero bias gradients are
views of one zero-filled buffer, made outside the custom op (its outputs may not alias). Then
22 -> 20: the SE backward kernel writes the weight-gradient operands in the weights' dtype (two
casts). The reference's autograd: 20 launches, 16.6 MiB; fused 5.86 MiB.

Backward, eval mode (frozen BatchNorm: fine-tuning with frozen statistics, input gradients of
an eval model): the forward stays the folded eval kernels and keeps only x, the parameters and
a copy of the running statistics, so an eval forward that never gets a backward (inference
without torch.no_grad) costs what it costs without gradients. The backward recomputes the
block with the train pipeline above, ``batch_statistics=False``: the BatchNorms normalise with
the running statistics (kernels/batchnorm_statistics.py FROZEN gives their fp32 copy, scale and
shift in one launch each; the convs write no tile statistics), which yields y1, h1, y2, h2, y3;
then the train backward with frozen statistics: dy = scale * g (w = q = 0, no batch terms), and
the coefficients kernel also writes the conv bias gradients, scale * dbeta, which are not zero
here. Counted per block (maxvit_fast.traffic, bf16, MBConv(64, 64), 1x64x56x56 channels-last,
fold cache warm; forward + backward, the backward with its recompute): stride 1 with residual
36 launches / 16.4 MiB written (forward 5 / 3.5: 4 kernels and one copy of the 6 running
statistics), stride 2 33 / 7.6 MiB; the recompute of the reference function with torch ops differentiated by
torch.func.vjp that this replaced 45 / 32.0 and 42 / 14.7; the reference's own autograd 35 / 28.5
and 33 / 14.2. GPU speed: not measured.

Layout: the fused path works channels-last. In eval mode the first kernel reads x through the
view ``x.permute(0, 2, 3, 1)`` with its strides (no copy for any layout). The train-mode expand
conv and the residual read x through ``x.permute(0, 2, 3, 1).reshape(B, H*W, C)``, which is
free for NCHW-contiguous and channels-last inputs (the kernel takes the strides); ``reshape``
copies (to channels-last) only when H and W cannot be merged (e.g. a width slice of a larger
tensor). The result is returned as an NCHW-shaped view of a channels-last (B, Ho, Wo, C)
tensor: ``out.permute(0, 2, 3, 1)`` (what the model does next) is contiguous.

Drop path (MBConvResidual.dropsample): identity in eval mode and at probability 0 (the model's
setting): the residual is fused. In train mode with probability > 0 the fused path computes the
block without its residual and applies the module's own Dropsample and the add with torch.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..batchnorm import (FoldCache, copy_running_stats_, fold_batchnorm, running_update_momentum,
                         update_running_stats_)
from ..dispatch import use_kernels
from ..reference import MBConvResidual, SqueezeExcitation
from .library import custom_op

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Folded eval-mode parameters per MBConv module (see FoldCache for what invalidates an entry).
folded_cache = FoldCache()


def _empty(shape, dtype, device):
    """Every buffer the fused path hands a kernel to write comes from here (tests replace it
    with a NaN-filled allocation to catch anything a kernel leaves unwritten)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _ones(n: int, device: torch.device) -> torch.Tensor:
    """fp32 ones (the unit epilogue scale of the train-mode convs), made once per size and device.
    Not cached while a CUDA graph is being captured: a tensor filled inside a capture holds its
    values only once the graph has been replayed."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.ones(n, dtype=torch.float32, device=device)
    return _cached_ones(n, device)


@functools.lru_cache(maxsize=64)
def _cached_ones(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32, device=device)


@dataclass
class _Parts:
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    dw: nn.Conv2d
    bn2: nn.BatchNorm2d
    se_reduce: nn.Linear
    se_expand: nn.Linear
    conv3: nn.Conv2d
    bn3: nn.BatchNorm2d
    net: nn.Sequential
    residual: bool
    dropsample: nn.Module | None

    @property
    def stride(self) -> int:
        return self.dw.stride[0]

    @property
    def bns(self):
        return (self.bn1, self.bn2, self.bn3)

    def params(self):
        """The parameters the block's output depends on, in a fixed order."""
        return (
            self.conv1.weight, self.conv1.bias, self.bn1.weight, self.bn1.bias,
            self.dw.weight, self.dw.bias, self.bn2.weight, self.bn2.bias,
            self.se_reduce.weight, self.se_expand.weight,
            self.conv3.weight, self.conv3.bias, self.bn3.weight, self.bn3.bias,
        )


def _split(module: nn.Module) -> _Parts | str:
    """The block's layers, or the reason the fused path cannot run it."""
    residual, dropsample, net = False, None, module
    if isinstance(module, MBConvResidual):
        residual, dropsample, net = True, module.dropsample, module.fn
    if not isinstance(net, nn.Sequential) or len(net) != 9:
        return "module is not a reference MBConv (nn.Sequential of 9 layers)"
    conv1, bn1, act1, dw, bn2, act2, se, conv3, bn3 = net
    bn_ok = all(
        type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.running_mean is not None
        for bn in (bn1, bn2, bn3)
    )
    if not bn_ok:
        return "MBConv BatchNorm layers must be affine BatchNorm2d with running statistics"
    if not all(type(a) is nn.GELU and a.approximate == "none" for a in (act1, act2)):
        return "MBConv activations must be exact (erf) nn.GELU"
    for conv in (conv1, conv3):
        if not (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.bias is not None):
            return "MBConv 1x1 convs must be plain Conv2d(kernel 1, bias)"
    hidden = conv1.out_channels
    if not (type(dw) is nn.Conv2d and dw.kernel_size == (3, 3) and dw.stride in ((1, 1), (2, 2))
            and dw.padding == (1, 1) and dw.dilation == (1, 1) and dw.groups == hidden
            and dw.in_channels == hidden and dw.out_channels == hidden and dw.bias is not None
            and dw.padding_mode == "zeros"):
        return "MBConv depthwise conv must be Conv2d(hidden, hidden, 3, stride 1 or 2, padding 1, groups=hidden, bias)"
    if conv3.in_channels != hidden or bn1.num_features != hidden or bn2.num_features != hidden \
            or bn3.num_features != conv3.out_channels:
        return "MBConv channel counts are inconsistent"
    if type(se) is not SqueezeExcitation or len(se.gate) != 6:
        return "MBConv squeeze-excitation is not the reference SqueezeExcitation"
    se_reduce, silu, se_expand, sigmoid = se.gate[1], se.gate[2], se.gate[3], se.gate[4]
    if not (type(se_reduce) is nn.Linear and se_reduce.bias is None and type(silu) is nn.SiLU
            and type(se_expand) is nn.Linear and se_expand.bias is None and type(sigmoid) is nn.Sigmoid
            and se_reduce.in_features == hidden and se_expand.out_features == hidden):
        return "MBConv squeeze-excitation layers differ from the reference"
    if residual and (conv1.in_channels != conv3.out_channels or dw.stride != (1, 1)):
        return "MBConv residual needs dim_in == dim_out and stride 1"
    return _Parts(conv1, bn1, dw, bn2, se_reduce, se_expand, conv3, bn3, net, residual, dropsample)


def _unsupported_reason(x: torch.Tensor, parts: _Parts | str) -> str | None:
    if isinstance(parts, str):
        return parts
    if x.dtype not in _FUSED_DTYPES:
        return f"fused MBConv supports fp16/bf16/fp32, got {x.dtype}"
    conv_dtypes = {p.dtype for p in (parts.conv1.weight, parts.conv1.bias, parts.dw.weight, parts.dw.bias,
                                     parts.conv3.weight, parts.conv3.bias, parts.se_reduce.weight,
                                     parts.se_expand.weight)}
    if conv_dtypes != {x.dtype}:
        return f"fused MBConv needs the conv/SE weights in the input dtype {x.dtype}, got {sorted(map(str, conv_dtypes))}"
    devices = {t.device for t in (*parts.net.parameters(), *parts.net.buffers())}
    if devices != {x.device}:
        return "MBConv parameters are not on the input's device"
    if x.numel() == 0:
        return "empty input"
    flags = {bn.training for bn in parts.bns}
    if len(flags) != 1:
        return "MBConv BatchNorm layers are in mixed train/eval modes"
    if parts.bn1.training:
        B, _, H, W = x.shape
        Ho, Wo = (H - 1) // parts.stride + 1, (W - 1) // parts.stride + 1
        if B * H * W < 2 or B * Ho * Wo < 2:
            return "train-mode BatchNorm needs more than one value per channel"  # reference raises
    return None


# ----------------------------------------------------------------------------------------------
# Prepared weights
# ----------------------------------------------------------------------------------------------

@dataclass
class _Weights:
    w1_t: torch.Tensor       # (dim_in, hidden), input dtype
    w3_t: torch.Tensor       # (hidden, dim_out), input dtype
    dw_w: torch.Tensor       # (9, hidden) fp32, tap-major
    dw_b: torch.Tensor       # (hidden,) fp32
    se_reduce: torch.Tensor  # (R, hidden) fp32
    se_expand: torch.Tensor  # (hidden, R) fp32
    scale1: torch.Tensor | None = None  # eval: folded BN1/BN3 epilogue scale/shift (fp32)
    shift1: torch.Tensor | None = None
    scale3: torch.Tensor | None = None
    shift3: torch.Tensor | None = None


def _layout_weights(p: _Parts) -> _Weights:
    """The eval path's kernel layouts of the block's weights (cached with the folded BatchNorm)."""
    w1, _, _, _, wd, bd, _, _, wr, we, w3, _, _, _ = p.params()
    hidden = w1.shape[0]
    return _Weights(
        w1_t=w1.detach().reshape(hidden, -1).t().contiguous(),
        w3_t=w3.detach().reshape(w3.shape[0], hidden).t().contiguous(),
        dw_w=wd.detach().reshape(hidden, 9).t().float().contiguous(),
        dw_b=bd.detach().float().contiguous(),
        se_reduce=wr.detach().float().contiguous(),
        se_expand=we.detach().float().contiguous(),
    )


def _fold_eval_weights(p: _Parts) -> _Weights:
    with torch.no_grad():
        w = _layout_weights(p)
        w.scale1, w.shift1 = fold_batchnorm(p.bn1, p.conv1.bias)
        scale2, shift2 = fold_batchnorm(p.bn2, p.dw.bias)
        w.dw_w = (w.dw_w * scale2[None, :]).contiguous()
        w.dw_b = shift2
        w.scale3, w.shift3 = fold_batchnorm(p.bn3, p.conv3.bias)
    return w


# ----------------------------------------------------------------------------------------------
# Kernel pipelines (no autograd): return the block output as a contiguous (B, Ho, Wo, dim_out)
# ----------------------------------------------------------------------------------------------

def _pixels_view(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): a view for NCHW-contiguous and channels-last tensors; a
    channels-last copy only when H and W are not mergeable."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


# Fusing the expand conv into the depthwise conv recomputes it for every tap (9x at stride 1,
# 2.25x at stride 2) to avoid writing and reading h1. Per byte of h1 traffic saved that costs
# about 4 * C_in FLOP at stride 1 and 0.625 * C_in at stride 2 (bf16; half that for fp32, whose
# bytes are twice as many). An H100 does ~990 dense bf16 TFLOP/s against 3.35 TB/s of HBM, about
# 300 FLOP per byte at peak; with the recompute at roughly half of peak, about 150. So the
# fusion is used up to 160 FLOP per byte saved: every stride-2 block of MaxViT-T (C_in <= 256:
# 40-160) and no stride-1 block (C_in >= 64: 256-2048, which would add 5.8 GFLOP per image to
# save 4 MiB). A decision on paper: GPU speed not measured.
MAX_RECOMPUTE_FLOP_PER_BYTE = 160.0


def fuses_expand_into_depthwise(dim_in: int, stride: int, dtype: torch.dtype) -> bool:
    """Whether eval mode computes the expand conv inside the depthwise kernel (see above)."""
    per_byte = (0.625 if stride == 2 else 4.0) * dim_in * 2 / dtype.itemsize
    return per_byte <= MAX_RECOMPUTE_FLOP_PER_BYTE


def _forward_eval(x: torch.Tensor, w: _Weights, stride: int, add_residual: bool) -> torch.Tensor:
    from ..kernels.depthwise_conv import depthwise_conv3x3, depthwise_output_size, depthwise_tiles_per_image
    from ..kernels.expand_depthwise_conv import (expand_depthwise_conv3x3, expand_depthwise_output_size,
                                                 expand_depthwise_tiles_per_image)
    from ..kernels.pointwise_conv import pointwise_conv
    from ..kernels.squeeze_excitation import se_gate

    B, dim_in, H, W = x.shape
    hidden, dim_out = w.w1_t.shape[1], w.w3_t.shape[1]
    dev, dt = x.device, x.dtype
    if fuses_expand_into_depthwise(dim_in, stride, dt):
        Ho, Wo = expand_depthwise_output_size(H, stride), expand_depthwise_output_size(W, stride)
        T = expand_depthwise_tiles_per_image(Ho, Wo)
        # (B, H, W, C) view of x: read in place whatever its strides
        h2, tile_sum = expand_depthwise_conv3x3(
            x.permute(0, 2, 3, 1), w.w1_t, w.scale1, w.shift1, w.dw_w, w.dw_b, stride,
            out=_empty((B, Ho, Wo, hidden), dt, dev), tile_sum=_empty((B * T, hidden), torch.float32, dev),
        )
    else:
        Ho, Wo = depthwise_output_size(H, stride), depthwise_output_size(W, stride)
        T = depthwise_tiles_per_image(Ho, Wo)
        h1 = pointwise_conv(_pixels_view(x), w.w1_t, w.scale1, w.shift1, out_gelu=True,
                            out=_empty((B, H * W, hidden), dt, dev))
        h2, tile_sum, _ = depthwise_conv3x3(
            h1.view(B, H, W, hidden), w.dw_w, w.dw_b, stride, out_gelu=True,
            out=_empty((B, Ho, Wo, hidden), dt, dev), tile_sum=_empty((B * T, hidden), torch.float32, dev),
        )
    gate = se_gate(tile_sum, B, Ho * Wo, w.se_reduce, w.se_expand, out=_empty((B, hidden), torch.float32, dev))
    out = pointwise_conv(
        h2.view(B, Ho * Wo, hidden), w.w3_t, w.scale3, w.shift3, gate=gate,
        residual=_pixels_view(x) if add_residual else None, out=_empty((B, Ho * Wo, dim_out), dt, dev),
    )
    return out.view(B, Ho, Wo, dim_out)


def _forward_train(x: torch.Tensor, params, running, eps, momentum: float, stride: int, add_residual: bool,
                   keep: bool, batch_statistics: bool):
    """Returns (out (B, Ho, Wo, dim_out), [mean1, var1, mean2, var2, mean3, var3], saved,
    new_running): the block output, the statistics (mean, biased variance; fp32) the three
    BatchNorms normalised with, when ``keep`` (a backward will run) what the backward reads: [y1,
    h1, y2, h2, y3, gate, se_sums, scale1, shift1, scale2, shift2, scale3, shift3] (see
    _train_gradients; without ``keep`` h1 and h2 overwrite y1 and y2), and new_running.

    ``batch_statistics`` (train mode): the BatchNorms normalise with the batch statistics; with
    ``running`` (the six running-statistic buffers, read only) new_running holds their updated
    values at ``momentum`` (new tensors, computed by the statistics kernels; the caller copies
    them in). Otherwise (eval mode with gradients: frozen BatchNorm) they normalise with
    ``running`` (required), the statistics returned are fp32 copies of it, the convs write no
    tile statistics and new_running is empty."""
    from ..kernels.batchnorm_gelu import batchnorm_gelu, batchnorm_gelu_tiles_per_image
    from ..kernels.batchnorm_statistics import batchnorm_running_statistics, batchnorm_statistics
    from ..kernels.depthwise_conv import (depthwise_conv3x3, depthwise_conv_config, depthwise_output_size,
                                          depthwise_tiles_per_image)
    from ..kernels.pointwise_conv import pointwise_conv, pointwise_conv_config
    from ..kernels.squeeze_excitation import se_gate

    (w1, b1, g1, be1, wd, bd, g2, be2, wr, we, w3, b3, g3, be3) = params
    B, dim_in, H, W = x.shape
    hidden, dim_out = w1.shape[0], w3.shape[0]
    dev, dt = x.device, x.dtype
    f32 = torch.float32
    Ho, Wo = depthwise_output_size(H, stride), depthwise_output_size(W, stride)
    P1, P2 = H * W, Ho * Wo
    T_dw, T_bn = depthwise_tiles_per_image(Ho, Wo), batchnorm_gelu_tiles_per_image(P2)
    block_m1 = pointwise_conv_config(hidden, dim_in, dt, False)["BLOCK_M"]
    block_m3 = pointwise_conv_config(dim_out, hidden, dt, True)["BLOCK_M"]
    block_p2 = depthwise_conv_config(hidden, dt)["BLOCK_P"]
    T1, T3 = -(-B * P1 // block_m1), -(-B * P2 // block_m3)

    new_running = []

    def bn_statistics(index, sums, m2, weight, bias, **tiling):
        # (mean, biased var, scale, shift) fp32, and the updated running statistics, in one launch
        out = tuple(_empty((weight.shape[0],), f32, dev) for _ in range(4))
        if not batch_statistics:  # frozen: fp32 copies of the running statistics, as eval mode uses them
            return batchnorm_running_statistics(*running[2 * index: 2 * index + 2], weight.detach(), bias.detach(),
                                                eps[index], out=out)
        update = {}
        if running:
            old = running[2 * index: 2 * index + 2]
            update = dict(running=old, momentum=momentum,
                          new_running=tuple(_empty(t.shape, t.dtype, dev) for t in old))
        res = batchnorm_statistics(sums, m2, weight.detach(), bias.detach(), eps[index], **tiling, **update, out=out)
        new_running.extend(res[4:])
        return res[:4]

    def stats_buffers(rows, channels):  # the tile statistics a conv writes for batch statistics
        if not batch_statistics:
            return {}
        return dict(tile_sum=_empty((rows, channels), f32, dev), tile_m2=_empty((rows, channels), f32, dev))

    def with_stats(conv_result):  # (out, tile_sum, tile_m2): a 1x1 conv without statistics returns out
        return conv_result if batch_statistics else (conv_result, None, None)

    with torch.no_grad():
        # the parameters go to the kernels as the module holds them (views, no per-step copies)
        w1, b1, wd, bd, wr, we, w3, b3 = (t.detach() for t in (w1, b1, wd, bd, wr, we, w3, b3))

        # 1. y1 = expand conv + conv bias, with tile statistics -> BN1 batch statistics
        a = _pixels_view(x)
        y1, s1, m1 = with_stats(pointwise_conv(
            a, w1.reshape(hidden, dim_in).t(), _ones(hidden, dev), b1,
            stats=batch_statistics, out=_empty((B, P1, hidden), dt, dev), **stats_buffers(T1, hidden),
        ))
        mean1, var1, scale1, shift1 = bn_statistics(0, s1, m1, g1, be1, block_rows=block_m1, rows_per_group=B * P1)
        # 2. h1 = gelu(BN1(y1)) (in place unless the backward needs y1)
        h1 = batchnorm_gelu(y1, scale1, shift1, out=_empty(y1.shape, dt, dev) if keep else y1)

        # 3. y2 = depthwise conv + conv bias, with tile statistics -> BN2 batch statistics
        y2, s2, m2 = depthwise_conv3x3(
            h1.view(B, H, W, hidden), wd, bd, stride, out_gelu=False, m2=batch_statistics,
            out=_empty((B, Ho, Wo, hidden), dt, dev), **stats_buffers(B * T_dw, hidden),
        )
        mean2, var2, scale2, shift2 = bn_statistics(1, s2, m2, g2, be2, block_rows=block_p2, rows_per_group=P2,
                                                    tiles_per_group=T_dw)
        # 4. h2 = gelu(BN2(y2)) with the SE sums; 5. the SE gate
        y2 = y2.view(B, P2, hidden)
        h2, se_sums = batchnorm_gelu(y2, scale2, shift2, out=_empty(y2.shape, dt, dev) if keep else y2, sums=True,
                                     tile_sum=_empty((B * T_bn, hidden), f32, dev))
        gate = se_gate(se_sums, B, P2, wr, we, out=_empty((B, hidden), f32, dev))

        # 6. y3 = project conv on gate * h2 + conv bias, with tile statistics -> BN3 batch statistics
        y3, s3, m3 = with_stats(pointwise_conv(
            h2, w3.reshape(dim_out, hidden).t(), _ones(dim_out, dev), b3,
            gate=gate, stats=batch_statistics, out=_empty((B, P2, dim_out), dt, dev), **stats_buffers(T3, dim_out),
        ))
        mean3, var3, scale3, shift3 = bn_statistics(2, s3, m3, g3, be3, block_rows=block_m3, rows_per_group=B * P2)

        # 7. out = BN3(y3) (+ x): one elementwise pass, fp32, one rounding
        out = batchnorm_gelu(y3, scale3, shift3, out=_empty(y3.shape, dt, dev), activation=False,
                             residual=a if add_residual else None)
        stats = [mean1, var1, mean2, var2, mean3, var3]
        saved = [y1, h1, y2, h2, y3, gate, se_sums, scale1, shift1, scale2, shift2, scale3, shift3] if keep else []
        return out.view(B, Ho, Wo, dim_out), stats, saved, new_running


def _train_gradients(grad_out, x, params, stats, saved, eps, stride: int, add_residual: bool,
                     batch_statistics: bool):
    """[grad x, grads of the 11 params other than the three conv biases] of the train-mode
    block from what its forward saved (the biases' gradients are exact zeros: _BIAS_INDICES);
    without ``batch_statistics`` (frozen BatchNorm: eval mode with gradients), of the block that
    normalised with the fixed ``stats``, followed by the three conv biases' gradients.

    Frozen statistics do not depend on the batch, so the BatchNorm backward is dy = scale * g:
    the same three passes with w = q = 0, and the coefficients kernel also stores each conv
    bias's gradient, sum(dy) = scale * dbeta (kernels/batchnorm_backward.py, FROZEN).

    Per BatchNorm, kernels/batchnorm_backward.py: one read-only pass for the per-tile sums the
    BN backward needs, one launch that turns them into per-channel coefficients (and the gamma /
    beta gradients), one elementwise pass writing the gradient of the BN input (in place over
    the incoming gradient where that is a temporary), with the GELU derivative and, for BN2, the
    SE gate and SE mean terms applied on the fly. The conv biases' gradients are exact zeros.
    The SE MLP's backward is one launch (kernels/squeeze_excitation.py se_gate_backward, from
    the forward's SE tile sums and the dL/dgate partials of the BN2 sums) plus two matmuls for
    its weight gradients. Between them cuBLAS / cuDNN for the convs' matmuls and the depthwise
    conv backward."""
    from ..kernels.batchnorm_backward import (batchnorm_backward_apply, batchnorm_backward_coefficients,
                                              batchnorm_backward_sums)
    from ..kernels.squeeze_excitation import se_gate_backward

    (w1, b1, g1, be1, wd, bd, g2, be2, wr, we, w3, b3, g3, be3) = params
    mean1, var1, mean2, var2, mean3, var3 = stats
    y1, h1, y2, h2, y3, gate, se_sums, scale1, shift1, scale2, shift2, scale3, shift3 = saved
    B, dim_in, H, W = x.shape
    _, P2, hidden = y2.shape
    dim_out = y3.shape[-1]
    P1 = H * W
    Ho, Wo = -(-H // stride), -(-W // stride)
    dt, dev = x.dtype, x.device

    def bn_backward(dh, y, mean, var, bn_eps, scale, shift, count, gamma, conv_bias, *, gelu, out, gate=None, dm=None,
                    sums=None):
        if sums is None:
            sums = batchnorm_backward_sums(dh, y, mean, var, bn_eps, scale, shift, gelu=gelu, se=False)
        coefficients = batchnorm_backward_coefficients(
            sums, scale, images=B, count=count, gate=gate, dm=dm, param_dtype=gamma.dtype,
            frozen_bias_dtype=None if batch_statistics else conv_bias.dtype)
        w, q, d_gamma, d_beta = coefficients[:4]
        bias_grads.extend(coefficients[4:])  # frozen: the conv bias's gradient
        dy = batchnorm_backward_apply(dh, y, mean, var, bn_eps, scale, shift, w, q, gelu=gelu, gate=gate, dm=dm, out=out)
        return dy, d_gamma, d_beta

    bias_grads = []  # frozen statistics: BN3's, BN2's, BN1's conv bias, in backward order

    with torch.no_grad():
        grad = grad_out.reshape(B, P2, dim_out).contiguous()
        # BN3 (no activation): dy3 = d(conv3 output), a new tensor (grad_out is not ours to overwrite)
        dy3, dg3, dbe3 = bn_backward(grad, y3, mean3, var3, eps[2], scale3, shift3, B * P2, g3, b3, gelu=False,
                                          out=_empty(grad.shape, dt, dev))
        dy3_rows = dy3.view(B * P2, dim_out)
        # project conv: the gradient of its input A = gate * h2, and of its weight (A rebuilt once)
        d_a = torch.mm(dy3_rows, w3.view(dim_out, hidden)).view(B, P2, hidden)
        gated = (h2 * gate.to(dt)[:, None, :]).view(B * P2, hidden)
        dw3 = torch.mm(dy3_rows.t(), gated)
        # BN2 + GELU + SE: the sums pass also gives d gate (sum over pixels of dA * h2); the SE
        # backward turns it into d mean; then the coefficients and dy2 (in place over dA)
        sums2 = batchnorm_backward_sums(d_a, y2, mean2, var2, eps[1], scale2, shift2, gelu=True, se=True)
        # SE MLP backward, one launch from the tile sums (column 4 of sums2: the dL/dgate
        # partials, read in place); then its two weight gradients as matmuls over the batch
        R = wr.shape[0]
        # (the matmul operands in the SE weights' dtype: the weight gradients need no cast)
        dm, d_logit, se_mean, se_hidden, d_reduced = se_gate_backward(
            se_sums, sums2[:, 4], gate, P2, wr, we, operand_dtype=wr.dtype,
            out=(_empty((B, hidden), torch.float32, dev),)
            + tuple(_empty(s, wr.dtype, dev) for s in ((B, hidden),) * 2 + ((B, R),) * 2))
        dwe = torch.mm(d_logit.t(), se_hidden)
        dwr = torch.mm(d_reduced.t(), se_mean)
        dy2, dg2, dbe2 = bn_backward(d_a, y2, mean2, var2, eps[1], scale2, shift2, B * P2, g2, bd, gelu=True,
                                          out=d_a, gate=gate, dm=dm, sums=sums2)
        # depthwise conv backward (cuDNN on a GPU): channels-last views of dy2 and h1
        dh1, dwd, _ = torch.ops.aten.convolution_backward(
            dy2.view(B, Ho, Wo, hidden).permute(0, 3, 1, 2), h1.view(B, H, W, hidden).permute(0, 3, 1, 2), wd,
            None, [stride, stride], [1, 1], [1, 1], False, [0, 0], hidden, [True, True, False])
        dh1 = dh1.permute(0, 2, 3, 1).reshape(B, P1, hidden).contiguous()  # no copy when cuDNN returns channels-last
        # BN1 + GELU, dy1 in place over dh1
        dy1, dg1, dbe1 = bn_backward(dh1, y1, mean1, var1, eps[0], scale1, shift1, B * P1, g1, b1, gelu=True,
                                      out=dh1)
        # expand conv: dx (+ the residual's gradient in the same matmul) and dW1
        dy1_rows = dy1.view(B * P1, hidden)
        x_rows = _pixels_view(x).reshape(B * P1, dim_in)
        w1_mat = w1.view(hidden, dim_in)
        if add_residual:
            dx = torch.addmm(grad.view(B * P1, dim_in), dy1_rows, w1_mat)
        else:
            dx = torch.mm(dy1_rows, w1_mat)
        dw1 = torch.mm(dy1_rows.t(), x_rows)

    def like(g, p):  # no launch: every gradient already has its parameter's dtype
        return g.reshape(p.shape).to(p.dtype)

    grads = [dw1, dg1, dbe1, dwd, dg2, dbe2, dwr, dwe, dw3, dg3, dbe3]
    grads = [dx.view(B, H, W, dim_in).permute(0, 3, 1, 2)] + [like(g, p) for g, p in zip(grads, _weight_params(params))]
    biases = [params[i] for i in _BIAS_INDICES]  # conv1, dw, conv3
    return grads + [like(g, p) for g, p in zip(bias_grads[::-1], biases)]


# positions of conv1.bias, dw.bias and conv3.bias in the 14 params (_Parts.params order)
_BIAS_INDICES = (1, 5, 11)


def _weight_params(params):
    return [p for i, p in enumerate(params) if i not in _BIAS_INDICES]


def _with_zero_bias_gradients(weight_grads, params):
    """The 14 parameter gradients: the op's 11 and, for the conv biases, exact zeros. The biases
    feed train-mode BatchNorms, which subtract the batch mean: their gradient is exactly zero
    (sum over rows of dy = scale * (sum g - N m1 - m2 sum xhat) = 0); zeros, not the rounding noise
    of that cancelling sum (what the reference returns). Views of one zero-filled buffer (one
    launch; outside the custom op, whose outputs must not alias each other)."""
    biases = [params[i] for i in _BIAS_INDICES]
    if len({b.dtype for b in biases}) == 1:
        zeros = torch.zeros(sum(b.numel() for b in biases), dtype=biases[0].dtype, device=biases[0].device)
        zeros = [z.view(b.shape) for z, b in zip(zeros.split([b.numel() for b in biases]), biases)]
    else:
        zeros = [torch.zeros_like(b) for b in biases]
    grads = list(weight_grads)
    for i, z in zip(_BIAS_INDICES, zeros):
        grads.insert(i, z)
    return grads


# ----------------------------------------------------------------------------------------------
# torch.library ops: the kernel pipelines as opaque ops with shape-only fake implementations,
# so torch.compile traces the fused model without graph breaks. Module state stays outside them:
# the eval op (no gradients) receives the folded weights (from the cache in eager mode, folded
# inside the traced graph under torch.compile); the train op (train mode, and eval mode when
# gradients are needed, with frozen statistics) returns the statistics it normalised with and
# the updated running statistics, which the caller copies into the buffers. Its backward is
# the mbconv_train_backward op. ``params`` is always the 14 tensors of ``_Parts.params``;
# ``eps`` the three BatchNorm eps.
# ----------------------------------------------------------------------------------------------

def _output_like(x: torch.Tensor, dim_out: int, stride: int) -> torch.Tensor:
    B, _, H, W = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    return x.new_empty((B, Ho, Wo, dim_out))


@custom_op("mbconv_eval")
def mbconv_eval_op(
    x: torch.Tensor, params: list[torch.Tensor], bn_stats: list[torch.Tensor], folded: list[torch.Tensor],
    eps: list[float], stride: int, add_residual: bool,
) -> torch.Tensor:
    """Eval-mode block output (B, Ho, Wo, dim_out) from the folded weights ``folded`` (the fields
    of ``_Weights`` in order). ``params``, ``bn_stats`` (running mean/var of BN1..3) and ``eps``
    are for the backward only (see _backward_eval)."""
    return _forward_eval(x, _Weights(*folded), stride, add_residual)


@mbconv_eval_op.register_fake
def _(x, params, bn_stats, folded, eps, stride, add_residual):
    return _output_like(x, params[10].shape[0], stride)


@custom_op("mbconv_train")
def mbconv_train_op(
    x: torch.Tensor, params: list[torch.Tensor], running: list[torch.Tensor], eps: list[float], momentum: float,
    stride: int, add_residual: bool, keep: bool, batch_statistics: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Block output (B, Ho, Wo, dim_out), the statistics the BNs normalised with
    [mean1, var1, mean2, var2, mean3, var3] (fp32, biased variances), with ``keep`` the tensors
    the backward reads, and the updated running statistics. ``batch_statistics`` (train mode):
    batch statistics, and with ``running`` (the BNs' six running buffers, or an empty list)
    their updated values at ``momentum``. Otherwise (eval mode with gradients) the fixed
    ``running`` statistics, and no updated ones (see _forward_train; empty lists otherwise)."""
    return _forward_train(x, params, running, eps, momentum, stride, add_residual, keep, batch_statistics)


def _train_saved_like(x, params, stride):
    from ..kernels.batchnorm_gelu import batchnorm_gelu_tiles_per_image

    B, _, H, W = x.shape
    hidden, dim_out = params[0].shape[0], params[10].shape[0]
    P1, P2 = H * W, ((H - 1) // stride + 1) * ((W - 1) // stride + 1)
    f32 = dict(dtype=torch.float32)
    return ([x.new_empty((B, P1, hidden)), x.new_empty((B, P1, hidden)), x.new_empty((B, P2, hidden)),
             x.new_empty((B, P2, hidden)), x.new_empty((B, P2, dim_out)), x.new_empty((B, hidden), **f32),
             x.new_empty((B * batchnorm_gelu_tiles_per_image(P2), hidden), **f32)]
            + [x.new_empty((n,), **f32) for n in (hidden, hidden, hidden, hidden, dim_out, dim_out)])


@mbconv_train_op.register_fake
def _(x, params, running, eps, momentum, stride, add_residual, keep, batch_statistics):
    hidden, dim_out = params[0].shape[0], params[10].shape[0]
    stats = [x.new_empty((n,), dtype=torch.float32) for n in (hidden, hidden, hidden, hidden, dim_out, dim_out)]
    saved = _train_saved_like(x, params, stride) if keep else []
    new_running = [torch.empty_like(t) for t in running] if batch_statistics else []
    return _output_like(x, dim_out, stride), stats, saved, new_running


@custom_op("mbconv_train_backward")
def mbconv_train_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor], stats: list[torch.Tensor],
    saved: list[torch.Tensor], eps: list[float], stride: int, add_residual: bool, batch_statistics: bool,
) -> list[torch.Tensor]:
    """[grad x, grads of the 11 params other than the conv biases] of mbconv_train's block
    (Triton BatchNorm backward kernels, cuBLAS/cuDNN for the convs; see _train_gradients),
    without ``batch_statistics`` followed by the gradients of the three conv biases."""
    # the op computes in the dtypes it was given: a backward called inside torch.autocast must not
    # recast its matmuls (the model's fused autocast path runs the whole block in one dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _train_gradients(grad_out, x, params, stats, saved, eps, stride, add_residual, batch_statistics)


@mbconv_train_backward_op.register_fake
def _(grad_out, x, params, stats, saved, eps, stride, add_residual, batch_statistics):
    B, C, H, W = x.shape
    biases = [] if batch_statistics else [params[i] for i in _BIAS_INDICES]
    return ([x.new_empty((B, H, W, C)).permute(0, 3, 1, 2)]
            + [torch.empty_like(p) for p in _weight_params(params) + biases])


def _setup_eval(ctx, inputs, output):
    x, params, bn_stats, folded, eps, stride, add_residual = inputs
    ctx.save_for_backward(x, *params, *bn_stats)
    ctx.config = (eps, stride, add_residual)
    ctx.num_folded = len(folded)


def _backward_eval(ctx, grad_out):
    """Eval mode (frozen BatchNorm): the forward kept only x, the parameters and the running
    statistics, so the backward first recomputes the block with mbconv_train's kernels,
    normalising with those statistics, for the tensors its backward reads, then runs that
    backward with frozen statistics."""
    x, *rest = ctx.saved_tensors
    params, bn_stats = rest[:14], rest[14:]
    eps, stride, add_residual = ctx.config
    _, stats, saved, _ = mbconv_train_op(x, params, bn_stats, eps, 0.0, stride, add_residual, True, False)
    grads = mbconv_train_backward_op(grad_out, x, params, stats, saved, eps, stride, add_residual, False)
    param_grads = grads[1:12]  # the 11 weight gradients, then the three conv biases'
    for i, g in zip(_BIAS_INDICES, grads[12:]):
        param_grads.insert(i, g)
    # list inputs take a list of gradients (None for the non-differentiable ones)
    return grads[0], param_grads, [None] * len(bn_stats), [None] * ctx.num_folded, None, None, None


def _setup_train(ctx, inputs, output):
    # (no default arguments: the dispatcher drops trailing defaults from ``inputs``, which would
    # change the structure of the gradients to return)
    x, params, running, eps, momentum, stride, add_residual, keep, batch_statistics = inputs
    _, stats, saved, _ = output
    ctx.num_running = len(running)
    if not keep:
        ctx.config = None  # no backward will run (the caller saw no autograd graph)
        return
    if not batch_statistics:  # (called with frozen statistics only by _backward_eval, without autograd)
        raise NotImplementedError("mbconv_train with frozen statistics has no autograd of its own")
    ctx.save_for_backward(x, *params, *stats, *saved)
    ctx.config = (eps, stride, add_residual)
    ctx.set_materialize_grads(False)  # the batch statistics and saved tensors get no (zero-filled) gradient


def _backward_train(ctx, grad_out, _grad_stats, _grad_saved, _grad_running):
    if ctx.config is None:
        raise RuntimeError("mbconv_train was called with keep=False: it saved nothing for a backward")
    x, *rest = ctx.saved_tensors
    params, stats, saved = rest[:14], rest[14:20], rest[20:]
    no_running = [None] * ctx.num_running
    no_grads = (None,) * 6  # eps, momentum, stride, add_residual, keep, batch_statistics
    if grad_out is None:  # the block output did not reach the loss
        return (None, [None] * len(params), no_running) + no_grads
    eps, stride, add_residual = ctx.config
    grads = mbconv_train_backward_op(grad_out, x, params, stats, saved, eps, stride, add_residual, True)
    return (grads[0], _with_zero_bias_gradients(grads[1:], params), no_running) + no_grads


mbconv_eval_op.register_autograd(_backward_eval, setup_context=_setup_eval)
mbconv_train_op.register_autograd(_backward_train, setup_context=_setup_train)


def _folded_weights(p: _Parts) -> _Weights:
    if torch.compiler.is_compiling():
        # in the traced graph: recomputed from the current parameters at every call, so a
        # compiled model never sees stale folded weights (the Python-side cache is not traced)
        return _fold_eval_weights(p)
    return folded_cache.get(p.net, lambda: _fold_eval_weights(p))


def _copy_together(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``tensors``, as contiguous views of one new buffer when they share a
    dtype (one launch instead of one per tensor)."""
    if len({t.dtype for t in tensors}) != 1:
        return [t.detach().clone() for t in tensors]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _fused(x: torch.Tensor, p: _Parts) -> torch.Tensor:
    training = p.bn1.training
    drop = p.residual and p.dropsample is not None and p.dropsample.training and p.dropsample.prob > 0
    add_residual = p.residual and not drop
    params = list(p.params())
    eps = [float(bn.eps) for bn in p.bns]
    if training:
        B, _, H, W = x.shape
        Ho, Wo = -(-H // p.stride), -(-W // p.stride)
        if B * Ho * Wo <= 1:  # what F.batch_norm raises (the variance of one value is undefined)
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got {B * Ho * Wo} for the block output of input size {tuple(x.shape)}")
        keep = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))
        momentum = running_update_momentum(p.bns)  # None: the running statistics are updated here
        running = [t for bn in p.bns for t in (bn.running_mean, bn.running_var)] if momentum is not None else []
        out, stats, _, new_running = mbconv_train_op(x, params, running, eps, momentum or 0.0, p.stride,
                                                     add_residual, keep, True)
        if momentum is not None:
            copy_running_stats_(p.bns, new_running)
        else:
            counts = (B * H * W, B * Ho * Wo, B * Ho * Wo)
            update_running_stats_(p.bns, [t.detach() for t in stats[0::2]], [t.detach() for t in stats[1::2]], counts)
    else:
        grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))
        bn_stats = [t for bn in p.bns for t in (bn.running_mean, bn.running_var)]
        if grad:  # the backward uses the running statistics of this forward: a copy (one launch)
            bn_stats = _copy_together(bn_stats)
        w = _folded_weights(p)
        folded = [getattr(w, f.name) for f in dataclasses.fields(w)]  # (not astuple: it deep-copies)
        out = mbconv_eval_op(x, params, bn_stats, folded, eps, p.stride, add_residual)
    out = out.permute(0, 3, 1, 2)  # NCHW shape, channels-last strides
    if drop:
        out = p.dropsample(out) + x
    return out


def mbconv(x: torch.Tensor, module: nn.Module, fused: bool = False) -> torch.Tensor:
    if not fused:
        return module(x)
    parts = _split(module)
    if not isinstance(parts, str):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"MBConv input must be a 4-D (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != parts.conv1.in_channels:
            raise ValueError(f"MBConv input has {x.shape[1]} channels, the block expects {parts.conv1.in_channels}")
    if use_kernels(x, fused, unsupported=_unsupported_reason(x, parts)):
        return _fused(x, parts)
    return module(x)
