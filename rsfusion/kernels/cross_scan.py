"""SS2D cross-scan / cross-merge (VMamba): route a 2-D map along four 1-D scan orders and back.

Direction ``k`` of ``cross_scan`` (the order VMamba's ``csm_triton.py`` uses):

* ``k = 0``: row-major flatten, index ``h * W + w``;
* ``k = 1``: column-major flatten (of the transposed map), index ``w * H + h``;
* ``k = 2``: ``k = 0`` reversed;
* ``k = 3``: ``k = 1`` reversed.

``cross_merge`` is the adjoint: ``y0 + rev(y2) + untranspose(y1 + rev(y3))`` in row-major order.
Because each map is the other's transpose (as linear maps), each backward is the other forward.
"""
import torch

__all__ = ["cross_scan", "cross_merge"]


def _scan(x):
    batch, channels, height, width = x.shape
    length = height * width
    out = x.new_empty(batch, 4, channels, length)
    out[:, 0] = x.reshape(batch, channels, length)
    out[:, 1] = x.transpose(2, 3).reshape(batch, channels, length)
    out[:, 2:4] = out[:, 0:2].flip(-1)
    return out


def _merge(y, height, width):
    batch, _, channels, length = y.shape
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = (y[:, 1] + y[:, 3].flip(-1)).view(batch, channels, width, height)
    return (rows.view(batch, channels, height, width) + cols.transpose(2, 3)).reshape(batch, channels, length)


class CrossScan(torch.autograd.Function):
    """(B, C, H, W) -> (B, 4, C, H*W); backward is ``cross_merge``."""

    @staticmethod
    def forward(ctx, x):
        ctx.hw = x.shape[2:]
        return _scan(x)

    @staticmethod
    def backward(ctx, grad):
        return _merge(grad, *ctx.hw).view(grad.shape[0], grad.shape[2], *ctx.hw)


class CrossMerge(torch.autograd.Function):
    """(B, 4, C, H, W) -> (B, C, H*W); backward is ``cross_scan``."""

    @staticmethod
    def forward(ctx, y):
        batch, _, channels, height, width = y.shape
        ctx.hw = (height, width)
        return _merge(y.reshape(batch, 4, channels, height * width), height, width)

    @staticmethod
    def backward(ctx, grad):
        batch, channels, _ = grad.shape
        return _scan(grad.view(batch, channels, *ctx.hw)).view(batch, 4, channels, *ctx.hw)


def cross_scan(x):
    """Four scan orders of a channel-first map: ``x`` (B, C, H, W) -> (B, 4, C, H*W)."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    return CrossScan.apply(x)


def cross_merge(y):
    """Sum the four scan orders back to row-major: ``y`` (B, 4, C, H, W) -> (B, C, H*W).

    Direction ``k`` of ``y`` holds a sequence of length H*W in the order ``cross_scan`` produced it;
    the (H, W) trailing dims only carry the map size (directions 1 and 3 are column-major inside).
    """
    if y.dim() != 5 or y.shape[1] != 4:
        raise ValueError(f"cross_merge: y must be (B, 4, C, H, W), got shape {tuple(y.shape)}")
    return CrossMerge.apply(y)
