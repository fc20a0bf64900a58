"""McNemar's test and the paired comparison over seeds, against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rsfusion.lightning_modules.outputs.significance import mcnemar, paired_seeds


def _correctness(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * b + [0] * c + [1] * both + [0] * neither, bool)
    second = np.array([0] * b + [1] * c + [1] * both + [0] * neither, bool)
    order = np.random.default_rng(0).permutation(a.size)  # order does not matter
    return a[order], second[order]


@pytest.mark.parametrize("b, c", [(7, 2), (3, 3), (0, 5), (12, 11)])
def test_exact_p_value_below_25_discordant_pixels(b, c):
    n, k = b + c, min(b, c)
    expected = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)  # two-sided binomial, p = 1/2
    result = mcnemar(*_correctness(b, c, both=40, neither=9))
    assert (result.b, result.c, result.exact) == (b, c, True)
    assert result.p_value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("b, c", [(30, 12), (100, 130), (20, 20)])
def test_chi_square_with_continuity_correction_from_25(b, c):
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    expected = math.erfc(math.sqrt(statistic / 2))  # chi-square survival function, one degree of freedom
    result = mcnemar(*_correctness(b, c, both=500, neither=50))
    assert not result.exact and result.statistic == pytest.approx(statistic)
    assert result.p_value == pytest.approx(expected, rel=1e-9)


def test_no_discordant_pixel_and_mismatched_pixels():
    same = np.array([1, 0, 1], bool)
    assert mcnemar(same, same).p_value == 1.0
    with pytest.raises(ValueError, match=r"scored on different pixels \(\(3,\) vs \(2,\)\)"):
        mcnemar(same, same[:2])


def test_paired_t_test_over_seeds():
    a, b = [91.0, 92.0, 93.5], [90.0, 90.0, 90.5]  # differences 1, 2, 3: mean 2, sample sd 1
    t = 2 / (1 / math.sqrt(3))
    expected = 1 - t / math.sqrt(t * t + 2)  # two-sided p of Student's t with 2 degrees of freedom
    assert paired_seeds(a, b) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(paired_seeds([90.0], [89.0]))  # one seed: no comparison
    assert paired_seeds([90.0, 91.0], [90.0, 91.0]) == 1.0
