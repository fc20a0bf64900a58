"""Is one model's accuracy different from another's? McNemar's test on the same test pixels, and a
paired comparison of the seeds' overall accuracies.

McNemar's test (Foody 2004, the remote-sensing reference) uses only the pixels on which the two maps
disagree about being right: ``b`` pixels the first model gets right and the second wrong, ``c`` the
reverse. Under the hypothesis of equal accuracy, ``b`` is Binomial(b + c, 1/2). With fewer than 25
discordant pixels the exact two-sided binomial p-value is used, else the chi-square statistic
``(|b - c| - 1)^2 / (b + c)`` with Edwards' continuity correction, one degree of freedom.

Test pixels of one scene are spatially correlated, not independent draws, so McNemar's p-values are
optimistic; and one seed says nothing about the variation between trainings. The paired t-test over
seeds (one OA difference per seed, same split per seed) speaks to that variation, with little power
for a handful of seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

EXACT_BELOW = 25  # discordant pixels under which the exact binomial test replaces the chi-square


@dataclass(frozen=True)
class McNemar:
    b: int  # right by the first model only
    c: int  # right by the second model only
    statistic: float  # chi-square (continuity-corrected); NaN when the exact test is used
    p_value: float
    exact: bool


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's test between two models' per-pixel correctness on the same test pixels."""
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"mcnemar: the two models were scored on different pixels ({correct_a.shape} vs "
                         f"{correct_b.shape})")
    b, c = int((correct_a & ~correct_b).sum()), int((~correct_a & correct_b).sum())
    n = b + c
    if n == 0:
        return McNemar(b, c, float("nan"), 1.0, True)
    if n < EXACT_BELOW:
        return McNemar(b, c, float("nan"), float(stats.binomtest(b, n, 0.5).pvalue), True)
    statistic = (abs(b - c) - 1) ** 2 / n
    return McNemar(b, c, float(statistic), float(stats.chi2.sf(statistic, df=1)), False)


def paired_seeds(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p-value of two models' scores over the same seeds; NaN with fewer than two
    seeds, 1.0 when every difference is the same zero, NaN when all differences are equal and not zero."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    if diff.size < 2:
        return float("nan")
    if np.allclose(diff, diff[0]):
        return 1.0 if np.isclose(diff[0], 0.0) else float("nan")
    return float(stats.ttest_rel(a, b).pvalue)
