"""A stand-in for :mod:`evalsyncd.samples` while it is being written (same names and shapes).

Reads a whole ``trajectories.jsonl`` per index (no cache, no ranged index
updates): correct, slow on big files. The view imports the real module once
it exists; this file then goes.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from evalsyncd.storage import Storage
from evalsyncd.store import StoredTrajectory
from evalsyncd.store.aio import reads_of
from evalsyncd.store.layout import StoreLayout

__all__ = [
    "Category",
    "Comparison",
    "ComparisonRow",
    "SampleEntry",
    "SampleFilter",
    "SampleIndex",
    "SampleReader",
    "compare",
]


class SampleFilter(StrEnum):
    """The reference filters."""

    ALL = "all"
    CORRECT = "correct"
    INCORRECT = "incorrect"
    ERRORS = "errors"


@dataclass(frozen=True)
class SampleEntry:
    """One line of ``trajectories.jsonl``: where it is and the fields the filters use."""

    line: int
    start: int
    length: int
    idx: int
    example_id: str
    reward: float | None
    correct: bool
    error: str | None

    def keep(self, which: SampleFilter) -> bool:
        if which == SampleFilter.CORRECT:
            return self.correct
        if which == SampleFilter.INCORRECT:
            return not self.correct and self.error is None
        if which == SampleFilter.ERRORS:
            return self.error is not None
        return True


@dataclass
class SampleIndex:
    """Every line's entry."""

    entries: list[SampleEntry] = field(default_factory=list)
    complete: bool = True
    indexed_bytes: int = 0

    def count(self, which: SampleFilter) -> int:
        return sum(1 for e in self.entries if e.keep(which))

    def page(self, number: int, size: int, which: SampleFilter) -> list[SampleEntry]:
        kept = [e for e in self.entries if e.keep(which)]
        return kept[(number - 1) * size : number * size]


def _entry(line: int, start: int, raw: bytes) -> SampleEntry:
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        return SampleEntry(line, start, len(raw), -1, "", None, False, f"unreadable line: {exc}")
    reward = d.get("reward", 0.0)
    reward = (
        float(reward) if isinstance(reward, int | float) and not isinstance(reward, bool) else None
    )
    error = d.get("error")
    idx = d.get("idx")
    return SampleEntry(
        line,
        start,
        len(raw),
        idx if isinstance(idx, int) else -1,
        str(d.get("example_id", "")),
        reward,
        reward is not None and reward > 0 and error is None,
        None if error is None else str(error),
    )


class SampleReader:
    """Sample reads of one host's store."""

    def __init__(self, storage: Storage, cache_dir: Any = None) -> None:
        self.storage = storage
        self._reads = reads_of(storage)
        self._layout = StoreLayout("")

    async def _data(self, run_id: str, benchmark: str) -> bytes:
        path = self._layout.trajectories(run_id, benchmark)
        data = await self._reads.read_or_none(path)
        if data is None:
            raise FileNotFoundError(f"{self.storage.url(path)}: no such object")
        return data

    async def aindex(self, run_id: str, benchmark: str) -> SampleIndex:
        data = await self._data(run_id, benchmark)
        index = SampleIndex()
        pos = 0
        for n, raw in enumerate(
            data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")
        ):
            index.entries.append(_entry(n, pos, raw))
            pos += len(raw) + 1
        index.indexed_bytes = len(data)
        return index

    async def apage(
        self, run_id: str, benchmark: str, number: int, size: int, filter: SampleFilter
    ) -> list[SampleEntry]:
        return (await self.aindex(run_id, benchmark)).page(number, size, filter)

    async def asearch(
        self,
        run_id: str,
        benchmark: str,
        pattern: str,
        *,
        regex: bool = False,
        filter: SampleFilter = SampleFilter.ALL,
        offset: int = 0,
        limit: int = 100,
    ) -> tuple[list[SampleEntry], int | None]:
        try:
            rx = re.compile(pattern if regex else re.escape(pattern), re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        data = await self._data(run_id, benchmark)
        index = await self.aindex(run_id, benchmark)
        out: list[SampleEntry] = []
        for e in index.entries[offset:]:
            if not e.keep(filter):
                continue
            text = data[e.start : e.start + e.length].decode("utf-8", "replace")
            with contextlib.suppress(ValueError):
                text = json.dumps(json.loads(text), ensure_ascii=False)
            if rx.search(text):
                out.append(e)
                if len(out) == limit:
                    return out, e.line + 1
        return out, None

    async def asample(self, run_id: str, benchmark: str, line: int) -> StoredTrajectory:
        index = await self.aindex(run_id, benchmark)
        if not 0 <= line < len(index.entries):
            raise FileNotFoundError(f"{benchmark} of run {run_id} has no line {line}")
        e = index.entries[line]
        data = await self._data(run_id, benchmark)
        raw = data[e.start : e.start + e.length]
        try:
            return StoredTrajectory.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"line {line} of {benchmark} is unreadable: {exc}") from None


class Category(StrEnum):
    """What happened to one example between A and B."""

    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    NEW_ERROR = "new_error"
    RESOLVED_ERROR = "resolved_error"
    PERSISTENT_ERROR = "persistent_error"
    ONLY_A = "only_a"
    ONLY_B = "only_b"
    UNCHANGED = "unchanged"


@dataclass
class ComparisonRow:
    category: Category
    entry_a: SampleEntry | None
    entry_b: SampleEntry | None


@dataclass
class Comparison:
    rows: list[ComparisonRow]
    counts: dict[Category, int]
    mcnemar_p: float | None
    reward_diff_ci: tuple[float, float] | None


def _category(a: SampleEntry | None, b: SampleEntry | None) -> Category:
    if a is None:
        return Category.ONLY_B
    if b is None:
        return Category.ONLY_A
    if a.error and b.error:
        return Category.PERSISTENT_ERROR
    if b.error:
        return Category.NEW_ERROR
    if a.error:
        return Category.RESOLVED_ERROR
    if a.correct and not b.correct:
        return Category.REGRESSION
    if b.correct and not a.correct:
        return Category.IMPROVEMENT
    return Category.UNCHANGED


def compare(
    a_entries: list[SampleEntry], b_entries: list[SampleEntry], *, seed: int = 0
) -> Comparison:
    a = {(e.example_id, e.idx): e for e in a_entries}
    b = {(e.example_id, e.idx): e for e in b_entries}
    rows = [
        ComparisonRow(_category(a.get(k), b.get(k)), a.get(k), b.get(k))
        for k in [*a, *(k for k in b if k not in a)]
    ]
    counts = {c: 0 for c in Category}
    for r in rows:
        counts[r.category] += 1
    n01 = sum(
        1 for r in rows if r.entry_a and r.entry_b and r.entry_a.correct and not r.entry_b.correct
    )
    n10 = sum(
        1 for r in rows if r.entry_a and r.entry_b and not r.entry_a.correct and r.entry_b.correct
    )
    n = n01 + n10
    p = (
        None
        if n == 0
        else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(n01, n10) + 1)) / 2**n)
    )
    diffs = [
        (r.entry_b.reward or 0.0) - (r.entry_a.reward or 0.0)
        for r in rows
        if r.entry_a is not None and r.entry_b is not None
    ]
    ci = None
    if diffs:
        rng = random.Random(seed)
        means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(1000))
        ci = (means[25], means[974])
    return Comparison(rows, counts, p, ci)
