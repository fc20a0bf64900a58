"""rsfusion.kernels.cross_scan / cross_merge: the four SS2D routes, their sum, and hand-written backward."""
import pytest
import torch

from rsfusion.kernels import cross_merge, cross_scan


def routes_by_index(x):
    """The four scan orders built element by element from their definitions."""
    batch, channels, height, width = x.shape
    length = height * width
    out = torch.empty(batch, 4, channels, length, dtype=x.dtype)
    for h in range(height):
        for w in range(width):
            row_major, col_major = h * width + w, w * height + h
            out[:, 0, :, row_major] = x[:, :, h, w]
            out[:, 1, :, col_major] = x[:, :, h, w]
            out[:, 2, :, length - 1 - row_major] = x[:, :, h, w]
            out[:, 3, :, length - 1 - col_major] = x[:, :, h, w]
    return out


def merge_by_definition(y):
    """y0 + rev(y2) + untranspose(y1 + rev(y3)), written with explicit reshapes."""
    batch, _, channels, height, width = y.shape
    seq = y.reshape(batch, 4, channels, height * width)
    rows = seq[:, 0] + seq[:, 2].flip(-1)
    cols = seq[:, 1] + seq[:, 3].flip(-1)
    cols = cols.reshape(batch, channels, width, height).transpose(2, 3).reshape(batch, channels, -1)
    return rows + cols


@pytest.mark.parametrize("height,width", [(3, 5), (4, 4), (1, 6)])
def test_cross_scan_routes_every_pixel_as_documented(height, width):
    x = torch.randn(2, 3, height, width)
    out = cross_scan(x)
    assert out.shape == (2, 4, 3, height * width)
    torch.testing.assert_close(out, routes_by_index(x), rtol=0, atol=0)


def test_cross_merge_is_the_documented_sum_and_inverts_the_scan():
    y = torch.randn(2, 4, 3, 3, 5)
    merged = cross_merge(y)
    assert merged.shape == (2, 3, 15)
    torch.testing.assert_close(merged, merge_by_definition(y))
    x = torch.randn(2, 3, 3, 5)
    # Each direction routes back to its own pixel, so merging the scan counts every pixel four times.
    torch.testing.assert_close(cross_merge(cross_scan(x).view(2, 4, 3, 3, 5)), 4 * x.flatten(2))


def test_cross_merge_is_the_adjoint_of_cross_scan():
    x, y = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    lhs = (cross_scan(x) * y.flatten(3)).sum()
    rhs = (x.flatten(2) * cross_merge(y)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_backward_passes_gradcheck():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cross_scan, (x,))
    assert torch.autograd.gradcheck(cross_merge, (y,))
    grad = torch.randn(2, 4, 3, 12, dtype=torch.float64)
    (x_grad,) = torch.autograd.grad(cross_scan(x), x, grad)
    torch.testing.assert_close(x_grad.flatten(2), merge_by_definition(grad.view(2, 4, 3, 3, 4)))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="cross_scan: x must be"):
        cross_scan(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="cross_merge: y must be"):
        cross_merge(torch.randn(2, 3, 3, 4, 4))
