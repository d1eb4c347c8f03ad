"""BatchNorm helpers for the fused ops: eval-mode folding, batch statistics from per-tile
partials, and running-statistic updates identical to ``nn.BatchNorm2d``'s.

Eval mode: BN(y) = y * scale + shift with scale = gamma / sqrt(running_var + eps) and
shift = beta - running_mean * scale, computed in fp32 whatever the parameter dtype.
Train mode: the kernels write per-tile (sum, centred sum of squares) partials of the BN input;
kernels/batchnorm_statistics.py merges them with Chan's parallel formula (no E[y^2] - E[y]^2
cancellation) and ``update_running_stats_`` applies momentum (or the cumulative average when
momentum is None), the unbiased variance and ``num_batches_tracked`` as ``F.batch_norm`` does.

``FoldCache`` stores derived tensors per module and recomputes them whenever anything they were
derived from may have changed; see its docstring.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn


def bn_scale_shift(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor):
    """fp32 (scale, shift) with BN(y) = y * scale + shift for the given mean and biased variance."""
    scale = torch.rsqrt(var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale.contiguous(), shift.contiguous()


def fold_batchnorm(bn: nn.BatchNorm2d, conv_bias: torch.Tensor | None):
    """Eval-mode BN after a conv with bias ``conv_bias``: fp32 (scale, shift) such that
    BN(conv_nobias(x) + conv_bias) = conv_nobias(x) * scale + shift."""
    with torch.no_grad():
        scale, shift = bn_scale_shift(bn, bn.running_mean, bn.running_var)
        if conv_bias is not None:
            shift = shift + conv_bias.float() * scale
        return scale.contiguous(), shift.contiguous()


def update_running_stats_(bns, means, variances, counts) -> None:
    """What ``nn.BatchNorm2d.forward`` in train mode does to the buffers of each BatchNorm in
    ``bns``, given its batch mean and biased variance over ``counts[i]`` values per channel.

    When every BatchNorm has fp32 running statistics and one momentum (MaxViT's blocks), all of
    them are updated with three foreach ops (one launch each on a GPU: the step count, the
    unbiased-variance correction, the momentum lerp); otherwise one at a time."""
    active = [i for i, bn in enumerate(bns) if bn.training and bn.track_running_stats]
    if not active:
        return
    with torch.no_grad():
        bns = [bns[i] for i in active]
        means, variances, counts = [means[i] for i in active], [variances[i] for i in active], [counts[i] for i in active]
        momenta = {bn.momentum for bn in bns}
        fast = (len(momenta) == 1 and None not in momenta
                and all(bn.running_mean is not None and bn.running_mean.dtype == torch.float32
                        and bn.running_var.dtype == torch.float32 and bn.num_batches_tracked is not None for bn in bns))
        if fast:
            (momentum,) = momenta
            torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
            unbiased = torch._foreach_mul(variances, [n / (n - 1) for n in counts])
            buffers = [t for bn in bns for t in (bn.running_mean, bn.running_var)]
            values = [t for pair in zip(means, unbiased) for t in pair]
            torch._foreach_lerp_(buffers, values, momentum)
            return
        for bn, mean, var, count in zip(bns, means, variances, counts):
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:
                    factor = 1.0 / float(bn.num_batches_tracked)
            if bn.running_mean is None:
                continue
            unbiased = var * (count / (count - 1))
            for buf, value in ((bn.running_mean, mean), (bn.running_var, unbiased)):
                buf.copy_((factor * value + (1.0 - factor) * buf.float()).to(buf.dtype))


def running_update_momentum(bns) -> float | None:
    """The momentum when the running statistics of every BatchNorm in ``bns`` can be updated by
    the kernels that compute their batch statistics (all in train mode with running statistics
    and a step counter, one momentum that is not None (a cumulative average needs the step count
    on the host), each mean/var pair of one dtype); None otherwise."""
    momenta = {bn.momentum for bn in bns}
    if len(momenta) != 1 or None in momenta:
        return None
    for bn in bns:
        if not (bn.training and bn.track_running_stats and bn.running_mean is not None
                and bn.num_batches_tracked is not None and bn.running_mean.dtype == bn.running_var.dtype
                and bn.running_mean.is_contiguous() and bn.running_var.is_contiguous()):
            return None
    return float(momenta.pop())


def copy_running_stats_(bns, new_values) -> None:
    """Write updated running statistics ([mean, var] per BatchNorm, in order) into the buffers and
    count the step: two foreach launches for all of them."""
    with torch.no_grad():
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
        torch._foreach_copy_([t for bn in bns for t in (bn.running_mean, bn.running_var)], list(new_values))


def _tensor_key(t: torch.Tensor):
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), tuple(t.stride()))


class FoldCache:
    """Derived tensors (folded BatchNorm, transposed weights) cached per module.

    The entry for a module is reused only while its key is unchanged. The key holds, for every
    parameter and buffer of the module: data_ptr, the in-place version counter ``_version``,
    dtype, device, shape and strides; plus every submodule's ``training`` flag and every
    BatchNorm's ``eps``. So an optimizer step or any in-place write (version bump),
    ``load_state_dict`` (copy_, a version bump), ``.to()``/``.half()`` (new storage, dtype or
    device) and ``train()``/``eval()`` all invalidate it. The entry also holds aliases
    (``detach()``) of the source tensors: their storage stays alive while the entry exists, so a
    new tensor can never reuse an old address and look unchanged (the stale source storage is
    freed at the next recompute).

    Not seen: writes through ``param.data`` (``.data`` has its own version counter, by PyTorch
    design). Call ``clear(module)`` after such writes.
    """

    def __init__(self):
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @staticmethod
    def key(module: nn.Module):
        try:
            tensors = tuple(_tensor_key(t) for t in (*module.parameters(), *module.buffers()))
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return None
        flags = tuple(m.training for m in module.modules())
        eps = tuple(m.eps for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        return tensors, flags, eps

    def get(self, module: nn.Module, build: Callable[[], object]):
        key = self.key(module)
        entry = self._entries.get(module)
        if key is not None and entry is not None and entry[0] == key:
            return entry[2]
        value = build()
        if key is not None:
            pinned = tuple(t.detach() for t in (*module.parameters(), *module.buffers()))
            self._entries[module] = (key, pinned, value)
        else:
            self._entries.pop(module, None)
        return value

    def clear(self, module: nn.Module | None = None) -> None:
        if module is None:
            self._entries.clear()
        else:
            self._entries.pop(module, None)

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._entries
