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

import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple, overload

from evalsyncd.errors import SampleError
from evalsyncd.samples.index import SampleIndex
from evalsyncd.samples.lines import SampleEntry

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "Category",
    "CompareRow",
    "CompareRows",
    "Comparison",
    "bootstrap_mean_ci",
    "categorize",
    "compare",
    "compare_indexes",
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
        rows: one per key, in A's file order, then B-only keys in B's order; a
            :class:`CompareRows`, whose rows are made when looked at
            (``rows.select(Category.REGRESSION)[:50]``: a page of one category).
        counts: rows per category (every category present, zeros included).
        matched: pairs found in both runs.
        mcnemar_p: two-sided exact McNemar p-value; ``None`` without matched pairs.
        reward_diff: mean of ``reward_B - reward_A`` over matched pairs; ``None`` without.
        reward_diff_ci: 95 % paired bootstrap interval of ``reward_diff``; ``None`` without.
        duplicates_a: samples of A whose key occurred earlier in A (not compared).
        duplicates_b: the same for B.
    """

    rows: CompareRows
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
    diffs: Sequence[float] | npt.NDArray[np.float64],
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

    For two indexed files, :func:`compare_indexes` gives the same answer without
    making one :class:`SampleEntry` per sample first.
    """
    with _gc_paused():
        return _compare(_side_of_entries(a), _side_of_entries(b), seed)


def compare_indexes(a: SampleIndex, b: SampleIndex, *, seed: int = 0) -> Comparison:
    """:func:`compare` of two indexed files, read from their index as columns.

    Reads each index once, as columns (SQLite), and compares with ``numpy``; the rows' :class:`SampleEntry` values are read from
    the index when a row is looked at (a page of rows: one query per side), so
    the cost does not grow with the rows nobody looks at.

    Args:
        a: run A's index (the baseline), from :meth:`SampleReader.aindex
            <evalsyncd.samples.reader.SampleReader.aindex>`.
        b: run B's index (the candidate).
        seed: the bootstrap's seed.
    """
    with _gc_paused():
        return _compare(_side_of_index(a), _side_of_index(b), seed)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a few hundred thousand acyclic rows are made.

    Each allocation burst would otherwise run collections over every row made so far
    (half the time of a comparison of 100,000 samples). The collector is re-enabled
    after, unless it was off before.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True, slots=True)
class _Side:
    """One run's samples as columns, in file order, and how to get their entries."""

    keys: list[tuple[str, int]]
    outcome: npt.NDArray[np.int8]  # correct + 2 * errored
    reward: npt.NDArray[np.float64]
    load: Callable[[list[int]], list[SampleEntry]]  # entries at these positions


def _side_of_entries(entries: Sequence[SampleEntry]) -> _Side:
    import numpy as np

    n = len(entries)
    keys = [(e.example_id, e.idx) for e in entries]
    outcome = np.fromiter(
        (e.correct + 2 * (e.error is not None) for e in entries), dtype=np.int8, count=n
    )
    reward = np.fromiter((e.reward for e in entries), dtype=np.float64, count=n)
    return _Side(keys, outcome, reward, lambda at: [entries[i] for i in at])


def _side_of_index(index: SampleIndex) -> _Side:
    import numpy as np

    example_ids, idxs, outcomes, rewards, lines = index.columns()
    keys = list(zip(example_ids, idxs, strict=True))
    outcome = np.array(outcomes, dtype=np.int8)
    reward = np.array(rewards, dtype=np.float64)

    def load(at: list[int]) -> list[SampleEntry]:
        want = [lines[i] for i in at]
        try:
            found = index.find_many(want)
        finally:
            index.close()  # a kept comparison holds no connection open
        missing = [line for line in want if line not in found]
        if missing:
            raise SampleError(
                f"{index.url}: the index changed under a comparison (line {missing[0] + 1})"
            )
        return [found[line] for line in want]

    return _Side(keys, outcome, reward, load)


def _first(keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Each key's first position (a later duplicate is not compared)."""
    n = len(keys)
    return dict(zip(reversed(keys), range(n - 1, -1, -1), strict=True))


def _compare(a: _Side, b: _Side, seed: int) -> Comparison:
    import numpy as np

    first_a, first_b = _first(a.keys), _first(b.keys)
    ua = np.sort(np.fromiter(first_a.values(), dtype=np.int64, count=len(first_a)))
    ub = np.sort(np.fromiter(first_b.values(), dtype=np.int64, count=len(first_b)))
    get, keys_a = first_b.get, a.keys
    mb = np.fromiter((get(keys_a[i], -1) for i in ua.tolist()), dtype=np.int64, count=len(ua))
    both = mb >= 0
    only_b = ub[~np.isin(ub, mb[both])]
    pos_a = np.concatenate([ua, np.full(len(only_b), -1, dtype=np.int64)])
    pos_b = np.concatenate([mb, only_b])
    ma, mbb = ua[both], mb[both]
    oa, ob = a.outcome[ma].astype(np.int64), b.outcome[mbb].astype(np.int64)
    ca, cb = oa & 1, ob & 1
    pair = (oa >> 1) * 8 + (ob >> 1) * 4 + ca * 2 + cb
    cats = np.full(len(pos_a), _CODE[Category.ONLY_IN_B], dtype=np.int8)
    cats[: len(ua)] = _CODE[Category.ONLY_IN_A]
    cats[: len(ua)][both] = np.asarray(_PAIR_CODES, dtype=np.int8)[pair]
    tally = np.bincount(cats, minlength=len(_CATEGORIES))
    counts = {c: int(tally[i]) for i, c in enumerate(_CATEGORIES)}
    rows = CompareRows(a, b, pos_a, pos_b, cats)
    dup_a, dup_b = len(a.keys) - len(first_a), len(b.keys) - len(first_b)
    matched = int(both.sum())
    if not matched:
        return Comparison(rows, counts, 0, None, None, None, dup_a, dup_b, (0, 0))
    diffs = b.reward[mbb] - a.reward[ma]
    disc_a, disc_b = int((ca > cb).sum()), int((cb > ca).sum())
    return Comparison(
        rows,
        counts,
        matched,
        mcnemar_exact(disc_a, disc_b),
        float(diffs.sum()) / matched,
        bootstrap_mean_ci(diffs, seed=seed),
        dup_a,
        dup_b,
        (disc_a, disc_b),
    )


class CompareRows(Sequence[CompareRow]):
    """The rows of a :class:`Comparison`, made when looked at.

    A sequence of :class:`CompareRow`: one per key, in A's file order, then the
    keys of B only in B's order. Indexing by a slice (a page of rows) reads the
    entries of all its rows at once; :meth:`select` narrows to one category
    without reading anything.
    """

    _BATCH = 1000

    def __init__(
        self,
        a: _Side,
        b: _Side,
        pos_a: npt.NDArray[np.int64],
        pos_b: npt.NDArray[np.int64],
        cats: npt.NDArray[np.int8],
    ) -> None:
        self._a, self._b = a, b
        self._pos_a, self._pos_b, self._cats = pos_a, pos_b, cats

    def __len__(self) -> int:
        return len(self._cats)

    def __repr__(self) -> str:
        return f"CompareRows({len(self)} rows)"

    @overload
    def __getitem__(self, i: int) -> CompareRow: ...

    @overload
    def __getitem__(self, i: slice) -> list[CompareRow]: ...

    def __getitem__(self, i: int | slice) -> CompareRow | list[CompareRow]:
        if isinstance(i, slice):
            return self._make(range(len(self))[i])
        at = range(len(self))[i]  # IndexError out of range
        return self._make(range(at, at + 1))[0]

    def __iter__(self) -> Iterator[CompareRow]:
        for lo in range(0, len(self), self._BATCH):
            yield from self[lo : lo + self._BATCH]

    def select(self, category: Category | str | None) -> CompareRows:
        """The rows of one category (``None``: all), in the same order.

        Raises:
            ValueError: not a category.
        """
        if category is None:
            return self
        keep = self._cats == _CODE[Category(category)]
        return CompareRows(self._a, self._b, self._pos_a[keep], self._pos_b[keep], self._cats[keep])

    def _make(self, which: range) -> list[CompareRow]:
        pa = self._pos_a[which.start : which.stop : which.step].tolist()
        pb = self._pos_b[which.start : which.stop : which.step].tolist()
        cats = self._cats[which.start : which.stop : which.step].tolist()
        ea = iter(self._a.load([p for p in pa if p >= 0]))
        eb = iter(self._b.load([p for p in pb if p >= 0]))
        out: list[CompareRow] = []
        for p, q, c in zip(pa, pb, cats, strict=True):
            entry_a = next(ea) if p >= 0 else None
            entry_b = next(eb) if q >= 0 else None
            key = self._a.keys[p] if p >= 0 else self._b.keys[q]
            out.append(CompareRow(key, _CATEGORIES[c], entry_a, entry_b))
        return out


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

_CATEGORIES: tuple[Category, ...] = tuple(Category)
_CODE: dict[Category, int] = {c: i for i, c in enumerate(_CATEGORIES)}
_PAIR_CODES: list[int] = [
    _CODE[_TABLE[bool(k & 8), bool(k & 4), bool(k & 2), bool(k & 1)]] for k in range(16)
]
"""The category code of a matched pair by ``errored_a * 8 + errored_b * 4 + correct_a * 2 +
correct_b``."""
