"""Two runs' samples of one benchmark, compared sample by sample.

Samples are matched by ``(example_id, idx)``. Each matched pair, and each
sample found in one run only, gets a :class:`Category`, in the spirit of
tinker-cookbook's ``compare_eval_runs`` (run A is the baseline, B the candidate):

=====================  ===============================================
category               A / B
=====================  ===============================================
``regression``         correct / incorrect (neither errored)
``improvement``        incorrect / correct (neither errored)
``new_error``          no error / error
``resolved_error``     error / no error
``persistent_error``   error / error
``unchanged_correct``  correct / correct
``unchanged_incorrect`` incorrect / incorrect
``only_in_a``          in A only
``only_in_b``          in B only
=====================  ===============================================

"Correct" is ``reward > 0`` (the reference's filter). When a key occurs more
than once in one run (a retried example), its first occurrence is used and the
others are counted in ``duplicates_a`` / ``duplicates_b``.

The paired test: an exact McNemar test on correct/incorrect over the matched
pairs (``scipy.stats.binomtest`` on the discordant pairs, two-sided; ``1.0``
when there are none), and a paired bootstrap percentile interval of the mean
reward difference ``B - A`` (``numpy``, seeded: the same inputs and seed give
the same interval).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from evalsyncd.samples.lines import SampleEntry

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "Category",
    "CompareRow",
    "Comparison",
    "bootstrap_mean_ci",
    "categorize",
    "compare",
    "mcnemar_exact",
]

BOOTSTRAP_RESAMPLES = 2000
"""Resamples of the paired bootstrap."""


class Category(StrEnum):
    """What happened to one example between run A (baseline) and run B (candidate)."""

    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    NEW_ERROR = "new_error"
    RESOLVED_ERROR = "resolved_error"
    PERSISTENT_ERROR = "persistent_error"
    UNCHANGED_CORRECT = "unchanged_correct"
    UNCHANGED_INCORRECT = "unchanged_incorrect"
    ONLY_IN_A = "only_in_a"
    ONLY_IN_B = "only_in_b"


class CompareRow(NamedTuple):
    """One example of a comparison.

    Attributes:
        key: ``(example_id, idx)``.
        category: what happened.
        entry_a: its sample in A (``None``: only in B).
        entry_b: its sample in B (``None``: only in A).
    """

    key: tuple[str, int]
    category: Category
    entry_a: SampleEntry | None
    entry_b: SampleEntry | None


@dataclass(slots=True)
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        rows: one per key, in A's file order, then B-only keys in B's order.
        counts: rows per category (every category present, zeros included).
        matched: pairs found in both runs.
        mcnemar_p: two-sided exact McNemar p-value; ``None`` without matched pairs.
        reward_diff: mean of ``reward_B - reward_A`` over matched pairs; ``None`` without.
        reward_diff_ci: 95 % paired bootstrap interval of ``reward_diff``; ``None`` without.
        duplicates_a: samples of A whose key occurred earlier in A (not compared).
        duplicates_b: the same for B.
    """

    rows: list[CompareRow]
    counts: dict[Category, int]
    matched: int
    mcnemar_p: float | None
    reward_diff: float | None
    reward_diff_ci: tuple[float, float] | None
    duplicates_a: int = 0
    duplicates_b: int = 0
    discordant: tuple[int, int] = field(default=(0, 0))
    """``(A correct & B not, B correct & A not)``: the McNemar counts."""


def categorize(a: SampleEntry | None, b: SampleEntry | None) -> Category:
    """The category of one key from its two samples (at least one is not ``None``).

    Raises:
        ValueError: both are ``None``.
    """
    if a is None and b is None:
        raise ValueError("categorize needs at least one sample")
    if b is None:
        return Category.ONLY_IN_A
    if a is None:
        return Category.ONLY_IN_B
    ea, eb = a.error is not None, b.error is not None
    if ea and eb:
        return Category.PERSISTENT_ERROR
    if eb:
        return Category.NEW_ERROR
    if ea:
        return Category.RESOLVED_ERROR
    if a.correct and not b.correct:
        return Category.REGRESSION
    if b.correct and not a.correct:
        return Category.IMPROVEMENT
    return Category.UNCHANGED_CORRECT if a.correct else Category.UNCHANGED_INCORRECT


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    The binomial test of ``b`` successes in ``b + c`` trials at ``p = 0.5``
    (``scipy.stats.binomtest``); ``1.0`` when ``b + c == 0``.

    Raises:
        ValueError: a negative count.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, not {b}, {c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(min(1.0, binomtest(b, b + c, 0.5, alternative="two-sided").pvalue))


def bootstrap_mean_ci(
    diffs: Sequence[float],
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (paired differences).

    Values that repeat (0/1 rewards give at most three differences) are drawn
    as multinomial counts over the distinct values, the same distribution as
    resampling the values themselves, at a cost independent of ``len(diffs)``;
    otherwise the values are resampled in blocks.

    Raises:
        ValueError: ``diffs`` is empty.
    """
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    values, counts = np.unique(d, return_counts=True)
    if values.size <= 64:
        draws = rng.multinomial(n, counts / n, size=resamples)
        means = draws @ values / n
    else:
        means = np.empty(resamples)
        block = max(1, 4_000_000 // n)
        for i in range(0, resamples, block):
            k = min(block, resamples - i)
            means[i : i + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def compare(a: Sequence[SampleEntry], b: Sequence[SampleEntry], *, seed: int = 0) -> Comparison:
    """Categories, counts and the paired test of two runs' samples of one benchmark.

    Args:
        a: run A's samples (the baseline), e.g. ``list(index.entries())``.
        b: run B's samples (the candidate).
        seed: the bootstrap's seed.
    """
    first_a: dict[tuple[str, int], SampleEntry] = {}
    for e in a:
        first_a.setdefault((e.example_id, e.idx), e)
    first_b: dict[tuple[str, int], SampleEntry] = {}
    for e in b:
        first_b.setdefault((e.example_id, e.idx), e)
    table = _TABLE
    rows: list[CompareRow] = []
    add = rows.append
    diffs: list[float] = []
    diff = diffs.append
    disc_a = disc_b = 0
    get = first_b.get
    for key, ea in first_a.items():
        eb = get(key)
        if eb is None:
            add(CompareRow(key, Category.ONLY_IN_A, ea, None))
            continue
        ca, cb = ea.correct, eb.correct
        add(CompareRow(key, table[ea.error is not None, eb.error is not None, ca, cb], ea, eb))
        diff(eb.reward - ea.reward)
        if ca != cb:
            if ca:
                disc_a += 1
            else:
                disc_b += 1
    for key, eb in first_b.items():
        if key not in first_a:
            add(CompareRow(key, Category.ONLY_IN_B, None, eb))
    counts = dict.fromkeys(Category, 0)
    counts.update(Counter(row.category for row in rows))
    dup_a, dup_b = len(a) - len(first_a), len(b) - len(first_b)
    if not diffs:
        return Comparison(rows, counts, 0, None, None, None, dup_a, dup_b, (0, 0))
    return Comparison(
        rows,
        counts,
        len(diffs),
        mcnemar_exact(disc_a, disc_b),
        sum(diffs) / len(diffs),
        bootstrap_mean_ci(diffs, seed=seed),
        dup_a,
        dup_b,
        (disc_a, disc_b),
    )


def _entry(error: bool, correct: bool) -> SampleEntry:
    return SampleEntry(0, 0, 0, 0, "", 1.0 if correct else 0.0, correct, "e" if error else None)


_TABLE: dict[tuple[bool, bool, bool, bool], Category] = {
    (ea, eb, ca, cb): categorize(_entry(ea, ca), _entry(eb, cb))
    for ea in (False, True)
    for eb in (False, True)
    for ca in (False, True)
    for cb in (False, True)
}
"""The category of a matched pair by (A errored, B errored, A correct, B correct)."""
