"""Reduce and Rearrange layers of the einops stand-in (see ``einops/__init__.py``)."""

from torch import nn


def _axes(pattern):
    left, right = pattern.split("->")
    return left.split(), right.split()


class Reduce(nn.Module):
    def __init__(self, pattern, reduction, **axes_lengths):
        super().__init__()
        left, right = _axes(pattern)
        if axes_lengths or [a for a in left if a in right] != right or reduction not in ("mean", "sum", "max", "min"):
            raise NotImplementedError(f"einops stand-in: Reduce({pattern!r}, {reduction!r}) is not supported")
        self.pattern, self.reduction = pattern, reduction
        self.dims = tuple(i for i, a in enumerate(left) if a not in right)

    def forward(self, x):
        if self.reduction == "mean":
            return x.mean(dim=self.dims)
        if self.reduction == "sum":
            return x.sum(dim=self.dims)
        return x.amax(dim=self.dims) if self.reduction == "max" else x.amin(dim=self.dims)

    def extra_repr(self):
        return f"{self.pattern!r}, {self.reduction!r}"


class Rearrange(nn.Module):
    def __init__(self, pattern, **axes_lengths):
        super().__init__()
        left, right = _axes(pattern)
        if axes_lengths or [a for a in right if a != "1"] != left:
            raise NotImplementedError(f"einops stand-in: Rearrange({pattern!r}) is not supported")
        self.pattern, self.right = pattern, right

    def forward(self, x):
        sizes = iter(x.shape)
        return x.reshape([1 if a == "1" else next(sizes) for a in self.right])

    def extra_repr(self):
        return repr(self.pattern)
