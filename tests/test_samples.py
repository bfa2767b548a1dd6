"""Samples (evalsyncd.samples): index, pages, filters, search, compare, export.

The reads run on local disk and on the real S3 (SeaweedFS) and GCS
(fake-gcs-server) servers; the pure parts (line parsing, categories, the
paired test) are tables.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from evalsyncd.errors import SampleError, SampleNotFoundError, SearchPatternError
from evalsyncd.samples import (
    BadLine,
    Category,
    SampleEntry,
    SampleFilter,
    SampleReader,
    compare,
    compare_indexes,
)
from evalsyncd.samples.compare import bootstrap_mean_ci, categorize, mcnemar_exact
from evalsyncd.samples.export import COLUMNS, aexport_samples
from evalsyncd.samples.lines import LineScanner, ParsedLine, parse_line
from evalsyncd.storage import S3Storage
from evalsyncd.store import EvalStore, StoredTrajectory, StoredTurn
from tests.conftest import AnyStorage
from tests.helpers import run_closing as _run

PATH = "runs/r1/gsm/trajectories.jsonl"


def _line(
    i: int, *, reward: float | None = None, error: str | None = None, text: str = ""
) -> bytes:
    record = {
        "idx": i,
        "benchmark": "gsm",
        "example_id": f"ex{i}",
        "turns": [{"role": "user", "content": text or f"question {i}"}],
        "reward": float(i % 3 == 0) if reward is None else reward,
        "error": error if error is not None else ("boom" if i % 10 == 5 else None),
    }
    return json.dumps(record).encode() + b"\n"


def _lines(lo: int, hi: int) -> bytes:
    return b"".join(_line(i) for i in range(lo, hi))


def _expected(lo: int, hi: int, which: SampleFilter) -> list[int]:
    out = []
    for i in range(lo, hi):
        correct, err = i % 3 == 0, i % 10 == 5
        keep = {
            SampleFilter.ALL: True,
            SampleFilter.CORRECT: correct,
            SampleFilter.INCORRECT: not correct and not err,
            SampleFilter.ERRORS: err,
        }[which]
        if keep:
            out.append(i)
    return out


# -- reads on every backend --------------------------------------------------------------


def test_index_pages_filters_extension_and_rebuild(storage: AnyStorage, tmp_path: Path) -> None:
    """The index follows appends incrementally, is rebuilt on truncation or replacement,
    and pages, filters, single samples and head reads agree with the file."""

    async def scenario() -> None:
        await asyncio.to_thread(storage.write, PATH, _lines(0, 120))
        reader = SampleReader(storage, tmp_path / "cache", chunk_size=1000)
        head = await reader.ahead("r1", "gsm", 7)
        assert [e.idx for e, _ in head] == list(range(7))
        assert head[3][1].turns[0].content == "question 3"
        errors = await reader.ahead("r1", "gsm", 3, SampleFilter.ERRORS)
        assert [e.idx for e, _ in errors] == _expected(0, 120, SampleFilter.ERRORS)[:3]

        index = await reader.aindex("r1", "gsm")
        assert index.complete and index.exists
        size = len(_lines(0, 120))
        assert index.indexed_bytes == size
        for which in SampleFilter:
            assert index.count(which) == len(_expected(0, 120, which)), which
        reads = reader.range_reads
        page = await reader.apage("r1", "gsm", 2, 10, SampleFilter.INCORRECT)
        assert [e.idx for e, _ in page] == _expected(0, 120, SampleFilter.INCORRECT)[20:30]
        assert reader.range_reads == reads + 2  # the index check, the page
        again = await reader.apage("r1", "gsm", 2, 10, SampleFilter.INCORRECT, refresh=False)
        assert again == page and reader.range_reads == reads + 3
        assert all(t.idx == e.idx and t.reward <= 0 for e, t in page)
        assert await reader.apage("r1", "gsm", 99, 10) == []

        # append, with an unfinished last line: only complete lines are indexed
        await asyncio.to_thread(storage.append, PATH, _lines(120, 150) + b'{"idx": 150, "ben')
        index = await reader.aindex("r1", "gsm")
        assert index.count() == 150
        assert index.indexed_bytes == size + len(_lines(120, 150))
        entry, t = await reader.asample("r1", "gsm", 149)
        assert (entry.idx, t.example_id, entry.error) == (149, "ex149", None)
        raw = await asyncio.to_thread(storage.read_range, PATH, entry.start, entry.length)
        assert json.loads(raw)["idx"] == 149

        # truncation, then a replacement of the same size: both rebuild
        await asyncio.to_thread(storage.write, PATH, _lines(0, 40))
        assert (await reader.aindex("r1", "gsm")).count() == 40
        replaced = _lines(0, 40).replace(b'"ex39"', b'"EX39"')
        await asyncio.to_thread(storage.write, PATH, replaced)
        index = await reader.aindex("r1", "gsm")
        assert [e.example_id for e in index.page(0, 1_000)][-1] == "EX39"
        with pytest.raises(SampleNotFoundError, match="line 41"):
            await reader.asample("r1", "gsm", 40)

        # a missing file is an empty index; a bad name is refused before any I/O
        empty = await reader.aindex("r1", "nothere")
        assert (empty.exists, empty.count(), await reader.ahead("r1", "nothere", 5)) == (
            False,
            0,
            [],
        )
        assert empty.url.endswith("runs/r1/nothere/trajectories.jsonl")
        with pytest.raises(ValueError, match="benchmark"):
            await reader.aindex("r1", "../x")
        with pytest.raises(ValueError, match="nope"):
            index.page(0, 5, "nope")  # type: ignore[arg-type]
        assert index.count("errors") == index.count(SampleFilter.ERRORS)  # type: ignore[arg-type]

    _run(storage, scenario)


def test_search_text_regex_filters_and_paging(storage: AnyStorage, tmp_path: Path) -> None:
    """Text search is case-insensitive over decoded contents, regexes are Python's, and
    matches are paged with ``more``; an invalid regex is a clear error."""
    data = (
        _lines(0, 50) + _line(50, text='say "hi" \\ caf\u00e9 Needle') + _line(51, error="NEEDLE")
    )
    storage.write(PATH, data)
    reader = SampleReader(storage, tmp_path / "cache", chunk_size=700)

    async def scenario() -> None:
        hits = await reader.asearch("r1", "gsm", "needle")
        assert [e.idx for e, _ in hits.matches] == [50, 51] and not hits.more
        quoted = await reader.asearch("r1", "gsm", 'say "hi" \\ café')
        assert [e.idx for e, _ in quoted.matches] == [50]
        errors = await reader.asearch("r1", "gsm", "needle", filter=SampleFilter.ERRORS)
        assert [e.idx for e, _ in errors.matches] == [51]
        page = await reader.asearch("r1", "gsm", r"question 1\d$", regex=True, limit=4)
        assert [e.idx for e, _ in page.matches] == [10, 11, 12, 13] and page.more
        nxt = await reader.asearch(
            "r1", "gsm", r"question 1\d$", regex=True, offset=page.next_offset, limit=6
        )
        assert [e.idx for e, _ in nxt.matches] == [14, 15, 16, 17, 18, 19] and not nxt.more
        with pytest.raises(SearchPatternError, match=r"invalid regular expression '\('"):
            await reader.asearch("r1", "gsm", "(", regex=True)

    _run(storage, scenario)


def test_hostile_lines_are_reported_never_fatal(local_storage: Any, tmp_path: Path) -> None:
    """Invalid JSON, invalid UTF-8, non-objects and wrong shapes are bad lines with their
    line number and URL; every other line is a sample."""
    hostile = [
        _line(0),
        b"{not json\n",
        b'{"idx": 2, "benchmark": "gsm", "example_id": "\xff\xfe", "reward": 1.0}\n',
        b"[1, 2]\n",
        b'{"idx": "x", "benchmark": "gsm"}\n',
        b'{"idx": 5, "benchmark": "gsm", "reward": "lots"}\n',
        b"\n",
        b'{"benchmark": "gsm"}\n',
        _line(8, text="<script>alert(1)</script></textarea>"),
    ]
    local_storage.write(PATH, b"".join(hostile))
    reader = SampleReader(local_storage, tmp_path / "cache")

    async def scenario() -> None:
        index = await reader.aindex("r1", "gsm")
        assert [e.line for e in index.page(0, 100)] == [0, 2, 8]
        bad = index.bad_lines()
        assert [b.line for b in bad] == [1, 2, 3, 4, 5, 7]
        assert all(b.url.endswith(PATH) for b in bad)
        assert "malformed JSON" in bad[0].reason and "invalid UTF-8" in bad[1].reason
        assert "not an integer" in bad[3].reason and "not a number" in bad[4].reason
        assert str(bad[0]).endswith("line 2: " + bad[0].reason)
        _, t = await reader.asample("r1", "gsm", 2)
        assert t.example_id == "\ufffd\ufffd"
        _, t = await reader.asample("r1", "gsm", 8)
        assert t.turns[0].content == "<script>alert(1)</script></textarea>"

    _run(local_storage, scenario)


def test_reads_see_the_tail_log_on_s3(s3_storage: S3Storage, tmp_path: Path) -> None:
    """Bytes still in the daemon's tail log (not yet in the main object) are samples too,
    and the index extends over them."""
    s3_storage.tail_refresh_s = 0.0

    async def scenario() -> None:
        writer = s3_storage.tail_writer("w1")
        await writer.open()
        first = _lines(0, 10)
        version = await s3_storage.awrite(PATH, first)
        more = _lines(10, 15)
        writer.stage_append(
            PATH, len(first), more, base=len(first), main_version=version, mtime=1.0
        )
        await writer.commit()
        reader = SampleReader(s3_storage, tmp_path / "cache")
        assert (await reader.aindex("r1", "gsm")).count() == 15
        extra = _lines(15, 20)
        writer.stage_append(
            PATH, len(first + more), extra, base=len(first), main_version=version, mtime=2.0
        )
        await writer.commit()
        index = await reader.aindex("r1", "gsm")
        assert index.count() == 20
        (entry, t), *_ = await reader.apage("r1", "gsm", 3, 5)
        assert (entry.idx, t.idx) == (15, 15)

    _run(s3_storage, scenario)


def test_previews_cut_long_texts_and_load_the_rest(local_storage: Any, tmp_path: Path) -> None:
    """A long turn is cut in the preview; the rest comes by character ranges."""
    long = "abcdefghij" * 200_000
    local_storage.write(PATH, _line(0) + _line(1, text=long))
    reader = SampleReader(local_storage, tmp_path / "cache", chunk_size=100_000)

    async def scenario() -> None:
        await reader.aindex("r1", "gsm")
        assert reader.range_reads < 2_000_000 // 100_000  # reads grow along a long line
        reads = reader.range_reads
        preview = await reader.asample_preview("r1", "gsm", 1, max_chars=100)
        assert reader.range_reads == reads + 1  # the index check; the sample was kept parsed
        assert preview.trajectory.turns[0].content == long[:100]
        assert preview.truncated == {0: len(long)}
        assert await reader.atext("r1", "gsm", 1, 0, 100, 20) == long[100:120]
        with pytest.raises(SampleNotFoundError, match="no turn 3"):
            await reader.atext("r1", "gsm", 1, 3, 0, 10)

    _run(local_storage, scenario)


def test_read_many_concurrently_reports_failures_per_run(
    local_storage: Any, tmp_path: Path
) -> None:
    """Bulk reads return one result per pair, in order; a bad name fails alone."""
    for r in range(5):
        local_storage.write(f"runs/r{r}/gsm/trajectories.jsonl", _lines(0, r + 1))
    reader = SampleReader(local_storage, tmp_path / "cache", max_concurrency=3)
    pairs = [(f"r{r}", "gsm") for r in range(5)] + [("r9", "gsm"), ("..", "gsm")]
    got = _run(local_storage, lambda: reader.aread_many(pairs))
    assert [len(x.samples) for x in got] == [1, 2, 3, 4, 5, 0, 0]
    assert [x.error is None for x in got] == [True] * 6 + [False]
    assert "run_id" in (got[-1].error or "")
    correct = _run(
        local_storage, lambda: reader.aread_many(pairs[4:5], filter=SampleFilter.CORRECT)
    )
    assert [t.idx for t in correct[0].samples] == [0, 3]


# -- pure parts --------------------------------------------------------------------------


def test_line_scanner_keeps_offsets_across_chunks() -> None:
    """Lines split across chunks keep their byte offsets; an unfinished line waits."""
    data = b"ab\n\ncdef\r\nxyz"
    for cut in range(len(data) + 1):
        scanner = LineScanner()
        got = [*scanner.feed(data[:cut]), *scanner.feed(data[cut:])]
        assert got == [(0, 0, b"ab"), (1, 3, b""), (2, 4, b"cdef\r")], cut
        assert (scanner.offset, scanner.line, scanner.pending) == (10, 3, 3)
        assert scanner.tail == data[:10]


def test_a_line_past_the_limit_is_dropped_as_it_arrives() -> None:
    """A too-long line yields None with its true length; memory holds only its end."""
    data = b"ok\n" + b"x" * 10_000 + b"\nfine\n"
    for size in (7, 100, 5000, len(data)):
        scanner = LineScanner(max_line_bytes=1000)
        got = []
        for i in range(0, len(data), size):
            got += scanner.feed(data[i : i + size])
            assert scanner.pending <= 10_000 and len(scanner._partial) <= 5096
        assert got == [(0, 0, b"ok"), (1, 3, None), (2, 10_004, b"fine")], size
        assert scanner.tail == data[-4096:]
    bad = list(LineScanner(max_line_bytes=10).lines(b'{"idx": 1, "benchmark": "b"}\n', "u"))
    assert isinstance(bad[0], BadLine) and bad[0].length == 28 and "longer than 10" in bad[0].reason


def test_parse_line_table() -> None:
    """Blank lines are nothing, a BOM on line 0 is ignored, errors are cut short."""
    assert parse_line(b"  \r", 3, 0) is None
    bom = parse_line(b"\xef\xbb\xbf" + _line(4).rstrip(), 0, 0)
    assert isinstance(bom, ParsedLine) and bom.entry.idx == 4
    assert isinstance(parse_line(b"\xef\xbb\xbf" + _line(4).rstrip(), 1, 0), BadLine)
    lone = parse_line(
        b'{"idx": 1, "benchmark": "b", "example_id": "x\\udc80", "error": "\\ud800"}', 0, 0
    )
    assert isinstance(lone, ParsedLine)
    assert (lone.entry.example_id, lone.entry.error) == ("x\ufffd", "\ufffd")
    long_error = parse_line(_line(1, error="e" * 10_000).rstrip(), 0, 0)
    assert isinstance(long_error, ParsedLine) and len(long_error.entry.error or "") == 500
    assert isinstance(parse_line(b"true", 0, 0), BadLine)


def _e(key: str, idx: int, reward: float, error: str | None = None) -> SampleEntry:
    return SampleEntry(0, 0, 1, idx, key, reward, reward > 0, error)


@pytest.mark.parametrize(
    ("a", "b", "category"),
    [
        (_e("x", 0, 1), _e("x", 0, 0), Category.REGRESSION),
        (_e("x", 0, 0), _e("x", 0, 1), Category.IMPROVEMENT),
        (_e("x", 0, 1), _e("x", 0, 0, "timeout"), Category.NEW_ERROR),
        (_e("x", 0, 0, "timeout"), _e("x", 0, 1), Category.RESOLVED_ERROR),
        (_e("x", 0, 0, "a"), _e("x", 0, 0, "b"), Category.PERSISTENT_ERROR),
        (_e("x", 0, 1), _e("x", 0, 0.5), Category.UNCHANGED_CORRECT),
        (_e("x", 0, 0), _e("x", 0, -1), Category.UNCHANGED_INCORRECT),
        (_e("x", 0, 1), None, Category.ONLY_IN_A),
        (None, _e("x", 0, 1), Category.ONLY_IN_B),
    ],
)
def test_categories(a: SampleEntry | None, b: SampleEntry | None, category: Category) -> None:
    assert categorize(a, b) is category


def test_compare_matches_by_example_id_and_idx() -> None:
    """Keys are (example_id, idx); duplicates count once; counts and rows agree."""
    a = [_e("p", 0, 1), _e("q", 1, 0), _e("r", 2, 1), _e("r", 2, 0), _e("s", 3, 1)]
    b = [_e("p", 0, 0), _e("q", 1, 1), _e("r", 2, 1), _e("s", 4, 1), _e("q", 1, 0)]
    c = compare(a, b)
    assert [(r.key, r.category) for r in c.rows] == [
        (("p", 0), Category.REGRESSION),
        (("q", 1), Category.IMPROVEMENT),
        (("r", 2), Category.UNCHANGED_CORRECT),
        (("s", 3), Category.ONLY_IN_A),
        (("s", 4), Category.ONLY_IN_B),
    ]
    assert c.counts[Category.REGRESSION] == 1 and sum(c.counts.values()) == len(c.rows)
    assert (c.matched, c.duplicates_a, c.duplicates_b, c.discordant) == (3, 1, 1, (1, 1))
    assert c.mcnemar_p == 1.0 and c.reward_diff == 0.0
    empty = compare([_e("a", 0, 1)], [_e("b", 0, 1)])
    assert (empty.mcnemar_p, empty.reward_diff_ci) == (None, None)


def _record(key: str, idx: int, reward: float, error: str | None) -> bytes:
    record = {"idx": idx, "benchmark": "gsm", "example_id": key, "reward": reward, "error": error}
    return json.dumps(record).encode() + b"\n"


def test_compare_indexes_agrees_with_compare_and_reads_rows_on_demand(
    local_storage: Any, tmp_path: Path
) -> None:
    """``compare_indexes`` gives ``compare``'s rows, counts and test from two indexes
    (duplicates, errors, keys in one run only, a bad line); rows are read by page, by
    category, from either end; an index rebuilt under a kept comparison is an error."""
    import random

    rng = random.Random(7)
    sides: dict[str, list[tuple[str, int, float, str | None]]] = {"a": [], "b": []}
    for run, drop in (("a", 0.1), ("b", 0.15)):
        for i in range(600):
            if rng.random() < drop:
                continue
            error = "boom" if rng.random() < 0.05 else None
            sides[run].append((f"ex{i % 500}", i % 500, float(rng.random() < 0.5), error))
    for run, rows in sides.items():
        data = b"".join(_record(*r) for r in rows)
        local_storage.write(f"runs/{run}/gsm/trajectories.jsonl", data + b"not json\n")
    reader = SampleReader(local_storage, tmp_path / "cache")

    async def scenario() -> None:
        ia, ib = await reader.aindex("a", "gsm"), await reader.aindex("b", "gsm")
        old = compare(list(ia.entries()), list(ib.entries()), seed=3)
        new = compare_indexes(ia, ib, seed=3)
        assert list(new.rows) == list(old.rows) and len(new.rows) == len(old.rows)
        assert (new.counts, new.matched, new.discordant) == (
            old.counts,
            old.matched,
            old.discordant,
        )
        assert (
            (new.duplicates_a, new.duplicates_b) == (old.duplicates_a, old.duplicates_b) != (0, 0)
        )
        assert new.mcnemar_p == old.mcnemar_p and new.reward_diff_ci == old.reward_diff_ci
        assert new.reward_diff == pytest.approx(old.reward_diff, abs=1e-12)
        assert new.counts[Category.ONLY_IN_A] and new.counts[Category.ONLY_IN_B]
        for category in Category:
            picked = new.rows.select(category)
            assert len(picked) == new.counts[category]
            assert picked[:7] == [r for r in old.rows if r.category is category][:7]
        assert new.rows[-1] == old.rows[-1] and new.rows[3] == old.rows[3]
        with pytest.raises(IndexError):
            new.rows[len(new.rows)]
        empty = compare_indexes(ia, await reader.aindex("missing", "gsm"))
        assert empty.matched == 0 and empty.mcnemar_p is None
        assert (
            len(empty.rows)
            == empty.counts[Category.ONLY_IN_A]
            == len(old.rows) - sum(1 for r in old.rows if r.entry_a is None)
        )
        local_storage.write("runs/a/gsm/trajectories.jsonl", _record("x", 0, 1.0, None))
        await reader.aindex("a", "gsm")  # rebuilt: the kept comparison's lines are gone
        with pytest.raises(SampleError, match="changed under a comparison"):
            new.rows.select(Category.ONLY_IN_A)[-5:]

    _run(local_storage, scenario)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 0, 1.0),
        (5, 5, 1.0),
        (1, 9, 0.021484375),  # 2 * (1 + 10) / 2**10
        (0, 10, 0.001953125),  # 2 / 2**10
        (10, 0, 0.001953125),
        (3, 7, 0.34375),  # 2 * (1 + 10 + 45 + 120) / 2**10
    ],
)
def test_mcnemar_exact_known_values(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-9)


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    """Same seed, same interval; the interval holds the mean; both draw paths agree roughly."""
    diffs = [1.0] * 30 + [0.0] * 60 + [-1.0] * 10
    lo, hi = bootstrap_mean_ci(diffs, seed=1)
    assert (lo, hi) == bootstrap_mean_ci(diffs, seed=1)
    assert lo < 0.2 < hi and hi - lo < 0.3
    spread = [i / 100 for i in range(-50, 150)]  # many distinct values: the resampling path
    lo2, hi2 = bootstrap_mean_ci(spread, seed=3)
    assert lo2 < sum(spread) / len(spread) < hi2


# -- export ------------------------------------------------------------------------------


def _fleet(root: Path) -> dict[str, str]:
    """Two hosts, one run each, one bad line in h1; returns {host: run_id}."""
    ids = {}
    for host in ("h1", "h2"):
        store = EvalStore(root / host)
        run_id = store.create_run(f"model-{host}", ["gsm"], checkpoint_name="step-10")
        for i in range(4):
            t = StoredTrajectory(
                idx=i,
                benchmark="gsm",
                example_id=f"e{i}",
                turns=[StoredTurn(role="user", content="q")],
                reward=float(i % 2),
                error='a, "quoted"\nerror' if i == 2 else None,
            )
            store.write_trajectory(run_id, "gsm", t)
        ids[host] = run_id
    with (root / "h1" / "runs" / ids["h1"] / "gsm" / "trajectories.jsonl").open("ab") as f:
        f.write(b"\xff\xfe not json\n")
    return ids


def test_export_cli_local_fleet_and_host_read_back(tmp_path: Path) -> None:
    """The table has the header, one row per sample, byte ranges that point at the lines,
    and is read back by Python's csv (and pandas/duckdb when installed)."""
    root = tmp_path / "fleet"
    ids = _fleet(root)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "evalsyncd", "runs", "export", str(root), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "8 samples from 2 files, 1 bad lines" in run.stderr and "line 5" in run.stderr
    with (out / "samples.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["host"], r["run"], r["idx"]) for r in rows] == [
        (h, ids[h], str(i)) for h in ("h1", "h2") for i in range(4)
    ]
    row = rows[2]
    assert (row["model"], row["checkpoint"], row["correct"], row["error"]) == (
        "model-h1",
        "step-10",
        "0",
        'a, "quoted"\nerror',
    )
    data = (root / "h1" / "runs" / ids["h1"] / "gsm" / "trajectories.jsonl").read_bytes()
    start, length = int(row["start"]), int(row["length"])
    assert json.loads(data[start : start + length])["idx"] == 2
    for module in ("pandas", "duckdb"):
        try:
            lib = __import__(module)
        except ImportError:
            continue
        path = str(out / "samples.csv")
        n = len(lib.read_csv(path)) if module == "pandas" else lib.read_csv(path).shape[0]
        assert n == 8

    host = subprocess.run(
        [sys.executable, "-m", "evalsyncd", "runs", "export", str(root / "h2"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert host.returncode == 0, host.stderr
    with (out / "samples.csv").open(newline="", encoding="utf-8") as f:
        assert [r["host"] for r in csv.DictReader(f)] == [""] * 4


def test_export_of_an_s3_fleet(s3_storage: S3Storage, tmp_path: Path) -> None:
    """A fleet prefix in a bucket exports like a local one."""
    _fleet(tmp_path / "src")
    for path in sorted((tmp_path / "src").rglob("*")):
        if path.is_file():
            s3_storage.write(path.relative_to(tmp_path / "src").as_posix(), path.read_bytes())
    summary = _run(
        s3_storage, lambda: aexport_samples(s3_storage, "", tmp_path / "out", max_files=2)
    )
    assert (summary.rows, summary.files, summary.bad_lines, summary.ok) == (8, 2, 1, True)
    with (tmp_path / "out" / "samples.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["url"].split("/runs/")[0].rsplit("/", 1)[1] for r in rows} == {"h1", "h2"}
    assert all(r["url"].startswith("s3://") for r in rows)


def test_export_memory_is_bounded(local_storage: Any, tmp_path: Path) -> None:
    """Exporting a file many times the chunk size holds about a chunk, not the file."""
    store = EvalStore(local_storage)
    run_id = store.create_run("m", ["gsm"])
    path = f"runs/{run_id}/gsm/trajectories.jsonl"
    local_storage.append(path, b"".join(_line(i, text="x" * 400) for i in range(20_000)))
    size = local_storage.stat(path).size
    assert size > 9_000_000
    warm = EvalStore(tmp_path / "warm")  # the fixed cost: one run of one sample
    warm.write_trajectory(warm.create_run("m", ["gsm"]), "gsm", StoredTrajectory(0, "gsm"))
    asyncio.run(aexport_samples(warm.storage, "", tmp_path / "warm-out"))  # imports, caches

    def peak_of(storage: Any, out: str) -> int:
        tracemalloc.start()
        try:
            asyncio.run(aexport_samples(storage, "", tmp_path / out, chunk_size=256 << 10))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    base = peak_of(warm.storage, "warm-out-2")
    peak = peak_of(local_storage, "out")
    with (tmp_path / "out" / "samples.csv").open(newline="") as f:
        assert sum(1 for _ in csv.reader(f)) == 20_001
    assert peak - base < size / 8, (peak, base, size)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$EVALSYNCD_CACHE_DIR wins, then $XDG_CACHE_HOME/evalsyncd, then ~/.cache/evalsyncd."""
    from evalsyncd.samples import default_cache_dir

    monkeypatch.delenv("EVALSYNCD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "evalsyncd"
    monkeypatch.setenv("EVALSYNCD_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("EVALSYNCD_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "evalsyncd"


def test_an_unusable_cache_is_a_clear_error(local_storage: Any, tmp_path: Path) -> None:
    """A cache file that is not SQLite raises OSError naming it; head reads need no cache."""
    local_storage.write(PATH, _lines(0, 3))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "samples.sqlite3").write_bytes(b"not a database" * 100)
    reader = SampleReader(local_storage, tmp_path / "cache")

    async def scenario() -> None:
        assert len(await reader.ahead("r1", "gsm", 5)) == 3
        with pytest.raises(OSError, match=r"samples\.sqlite3 is unusable"):
            await reader.aindex("r1", "gsm")

    _run(local_storage, scenario)


def test_deeply_nested_lines_are_bad_lines_in_parse_and_export(tmp_path: Path) -> None:
    """A trajectories line nested deeper than the parser's recursion limit (a hostile host's
    ``[[[[...``) is a bad line, as in EvalStore's reader: parse_line says so, and runs export
    skips it with a warning instead of a RecursionError traceback."""
    for deep in (b"[" * 100_000, b'{"idx": 1, "benchmark": "b", "x": ' + b"[" * 100_000):
        bad = parse_line(deep, 3, 0)
        assert isinstance(bad, BadLine) and "nested too deeply" in bad.reason
    root = tmp_path / "fleet"
    ids = _fleet(root)
    with (root / "h2" / "runs" / ids["h2"] / "gsm" / "trajectories.jsonl").open("ab") as f:
        f.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    run = subprocess.run(
        [sys.executable, "-m", "evalsyncd", "runs", "export", str(root), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in run.stderr and "RecursionError" not in run.stderr, run.stderr
    assert "8 samples from 2 files, 2 bad lines" in run.stderr, run.stderr
    assert "nested too deeply" in run.stderr
