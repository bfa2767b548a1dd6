"""Hostile or damaged bytes fed to evalsyncd's readers cost a bounded amount and end in the tree.

Tail headers, catalogs, ``metadata.json``, ``result.json`` and ``summary.json``
as bytes, fixed cases and Hypothesis-generated ones (random, mutated valid
objects: truncated, bit-flipped, spliced; bombs, negative and huge offsets,
wrong types, invalid UTF-8, deep nesting), on ``MemoryStorage``: every read
ends in a value or an error of :mod:`evalsyncd.errors`, never another
exception, and a decompression bomb never inflates past the limit.

The property tests run a short profile in CI (``max_examples`` below); the
``slow`` ones run longer (``EVALSYNCD_LONG_PROPERTY=N`` multiplies them)::

    EVALSYNCD_LONG_PROPERTY=4 pytest tests/test_hostile_tail.py -m slow
"""

from __future__ import annotations

import contextlib
import json
import os
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from evalsyncd.catalog import CATALOG_NAME, MAX_CATALOG_BYTES, build_catalog, parse_catalog
from evalsyncd.errors import CorruptObjectError, EvalsyncdError
from evalsyncd.fleet import Fleet
from evalsyncd.storage import tail as tail_module
from evalsyncd.storage.memory import MemoryStorage, drop_bucket, memory_bucket
from evalsyncd.storage.tail import (
    MAX_FILES,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    FileTail,
    Piece,
    TailIndex,
    decode_header,
    encode_tail_object,
    object_name,
    tail_damage,
)
from evalsyncd.store import EvalStore
from evalsyncd.store.layout import MAX_JSON_BYTES

URL = "memory://b/p/.evalsyncd/tail/x"
MAGIC = b"evalsyncd-tail 1 "
LONG = int(os.environ.get("EVALSYNCD_LONG_PROPERTY") or 0) or 1
_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}


def tail_object(header: bytes | dict[str, Any], body: bytes = b"") -> bytes:
    """A tail object with this (JSON) header, compressed as the writer does."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    packed = zlib.compress(raw, 6)
    return MAGIC + str(len(packed)).encode() + b"\n" + packed + body


def header(**files: Any) -> dict[str, Any]:
    return {"writer": "w", "token": "t", "seq": 3, "created": 1.0, "files": files, "bodies": {}}


def entry(**over: Any) -> dict[str, Any]:
    base = {"k": "a", "size": 4, "base": 0, "mv": None, "mtime": 1.0, "p": [[3, 0, 4]]}
    return {**base, **over}


def bomb(inflated_bytes: int) -> bytes:
    comp = zlib.compressobj(9)
    parts = [comp.compress(b'{"pad":"')]
    block = b"a" * (1 << 20)
    for _ in range(inflated_bytes >> 20):
        parts.append(comp.compress(block))
    parts += [comp.compress(b'"}'), comp.flush()]
    packed = b"".join(parts)
    return MAGIC + str(len(packed)).encode() + b"\n" + packed


def decode(data: bytes) -> tuple[TailIndex, int] | int:
    """decode_header, asserting that any error is a CorruptObjectError naming the URL."""
    try:
        return decode_header(data, URL)
    except CorruptObjectError as exc:
        assert URL in str(exc) and exc.url == URL
        raise


# ── Fixed hostile headers ──────────────────────────────────────────────────────

HOSTILE_HEADERS: dict[str, bytes] = {
    "not a tail object": b"GIF89a" + b"\0" * 100,
    "preamble without digits": MAGIC + b"abc\n" + b"x" * 100,
    "preamble with a unicode digit": MAGIC + "١٢".encode() + b"\n" + b"x" * 100,
    "header longer than the limit": MAGIC + str(MAX_HEADER_BYTES + 1).encode() + b"\n",
    "not zlib": MAGIC + b"5\nhello",
    "truncated zlib": MAGIC + b"10\n" + zlib.compress(json.dumps(header()).encode())[:10],
    "invalid UTF-8": tail_object(b'{"writer": "\xff\xfe", "seq": 1}'),
    "not JSON": tail_object(b"{writer"),
    "a list": tail_object(b"[1, 2, 3]"),
    "deep nesting": tail_object(b"[" * 100_000 + b"]" * 100_000),
    "files is a list": tail_object({**header(), "files": []}),
    "seq is a string": tail_object({**header(), "seq": "3"}),
    "seq negative": tail_object({**header(), "seq": -1}),
    "seq past 2**64": tail_object({**header(), "seq": 2**64}),
    "created NaN": tail_object(b'{"writer":"w","seq":1,"created":NaN,"files":{}}'),
    "created past a float": tail_object({**header(), "created": 10**400}),
    "mtime past a float": tail_object(header(a=entry(mtime=10**400))),
    "mtime past a float, a bad piece": tail_object(
        header(a=entry(mtime=-(10**400), p=[[True, 0, 4]]))
    ),
    "size a bool": tail_object(header(a=entry(size=True))),
    "size a float": tail_object(header(a=entry(size=4.0))),
    "size huge": tail_object(header(a=entry(size=10**30, p=[[3, 0, 10**30]]))),
    "base past size": tail_object(header(a=entry(base=9))),
    "negative position": tail_object(header(a=entry(p=[[3, -4, 4]]))),
    "negative length": tail_object(header(a=entry(size=0, p=[[3, 0, 4], [3, 4, -4]]))),
    "piece of a later seq": tail_object(header(a=entry(p=[[4, 0, 4]]))),
    "piece of an unknown seq": tail_object(header(a=entry(p=[[1, 0, 4]]))),
    "piece not a triple": tail_object(header(a=entry(p=[[3, 0]]))),
    "pieces a dict": tail_object(header(a=entry(p={"3": 1}))),
    "pieces do not add up": tail_object(header(a=entry(size=5))),
    "kind unknown": tail_object(header(a=entry(k="z"))),
    "replace with a base": tail_object(header(a=entry(k="r", base=2, size=6, p=[[3, 0, 4]]))),
    "entry a string": tail_object(header(a="entry")),
    "path escapes": tail_object(header(**{"runs/../../x": entry()})),
    "path absolute": tail_object(header(**{"/etc/passwd": entry()})),
    "mv an int": tail_object(header(a=entry(mv=7))),
    "bodies negative": tail_object({**header(), "bodies": {"1": -5}}),
    "bodies key not a seq": tail_object({**header(), "bodies": {"x": 5}}),
    "bodies key huge": tail_object({**header(), "bodies": {"9" * 5000: 5}}),
    "int of 5000 digits": tail_object(b'{"writer":"w","seq":' + b"9" * 5000 + b"}"),
    "too many files": tail_object(header(**{f"f{i}": entry() for i in range(MAX_FILES + 1)})),
    "many values": tail_object(b'{"files":{},"pad":[' + b",".join([b"1"] * 2_000_000) + b"]}"),
    "bomb": bomb(64 << 20),
}


@pytest.mark.parametrize("name", list(HOSTILE_HEADERS))
def test_hostile_tail_header_is_a_corrupt_object_error_naming_the_url(name: str) -> None:
    """Each hostile or damaged header ends in CorruptObjectError naming the object, nothing else."""
    with pytest.raises(CorruptObjectError):
        decode(HOSTILE_HEADERS[name])


def test_limit_errors_name_the_limit_and_the_size_seen() -> None:
    """Past a limit the message names the limit and the size the reader saw."""
    with pytest.raises(CorruptObjectError, match=f"limit of {MAX_INDEX_BYTES} bytes"):
        decode(bomb(64 << 20))
    with pytest.raises(CorruptObjectError, match=f"{MAX_HEADER_BYTES + 1} bytes"):
        decode(HOSTILE_HEADERS["header longer than the limit"])
    with pytest.raises(CorruptObjectError, match=f"{MAX_FILES + 1} files"):
        decode(HOSTILE_HEADERS["too many files"])


def test_a_bomb_costs_at_most_about_twice_the_inflated_limit() -> None:
    """A 200 KB tail object inflating to 256 MiB is refused having held ~2x MAX_INDEX_BYTES."""
    data = bomb(256 << 20)
    assert len(data) < 512 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(CorruptObjectError, match="inflates to more than the limit"):
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_INDEX_BYTES, f"peak {peak} bytes"


def test_short_data_asks_for_at_most_the_header_limit() -> None:
    """A truncated probe asks for more bytes, never more than the header limit allows."""
    full = tail_object(header(a=entry()), b"data")
    for cut in range(1, len(full) - 4):
        got = decode(full[:cut])
        assert isinstance(got, int) and cut < got <= MAX_HEADER_BYTES + 64
    with pytest.raises(CorruptObjectError):  # an empty object is no tail object
        decode(b"")
    index, body_at = decode(full)  # type: ignore[misc]
    assert index.files["a"].pieces == (Piece(3, 0, 4),) and full[body_at:] == b"data"


# ── Property: random and mutated tail objects ─────────────────────────────────


@st.composite
def valid_tail_objects(draw: st.DrawFn) -> bytes:
    seq = draw(st.integers(0, 50))
    files = {}
    for i in range(draw(st.integers(0, 4))):
        lengths = draw(st.lists(st.integers(0, 20), max_size=4))
        pieces = tuple(Piece(seq, sum(lengths[:j]), n) for j, n in enumerate(lengths))
        base = draw(st.integers(0, 10))
        files[f"runs/r{i}/t.jsonl"] = FileTail("a", base + sum(lengths), base, None, 1.0, pieces)
    index = TailIndex("w", seq, 1.0, files, token="t")
    body = b"".join(b"x" * p.length for ft in files.values() for p in ft.pieces)
    return encode_tail_object(index, body)[0]


def _mutate(data: bytes, how: str, at: int, value: int) -> bytes:
    if not data:
        return data
    at %= len(data)
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ (1 << (value % 8))]) + data[at + 1 :]
    if how == "splice":
        return data[:at] + value.to_bytes(8, "little", signed=True) + data[at:]
    return data[:at] + data[at + 1 :]


mutated = st.builds(
    _mutate,
    valid_tail_objects(),
    st.sampled_from(["truncate", "flip", "splice", "drop"]),
    st.integers(0, 10**6),
    st.integers(-(2**63), 2**63 - 1),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["a", "r", "files", "p", "../x"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["k", "size", "base", "mv", "mtime", "p"]), children)
    ),
    max_leaves=20,
)
shaped_headers = st.builds(
    lambda files, seq, bodies: tail_object(
        {"writer": "w", "seq": seq, "created": 1.0, "files": files, "bodies": bodies}
    ),
    st.dictionaries(st.sampled_from(["a", "runs/r/x.jsonl", "", "..", "a//b"]), json_values),
    json_values,
    st.dictionaries(st.sampled_from(["0", "1", "-1", "x"]), json_values),
)
hostile_bytes = (
    mutated
    | shaped_headers
    | st.binary(max_size=200)
    | st.binary(max_size=200).map(lambda b: MAGIC + b)
    | st.binary(max_size=200).map(lambda b: MAGIC + str(len(b)).encode() + b"\n" + b)
)


def _decodes_or_corrupt(data: bytes) -> None:
    try:
        got = decode(data)
    except CorruptObjectError:
        return
    if isinstance(got, int):
        assert got > len(data)
        return
    index, body_at = got
    assert 0 <= body_at <= len(data)
    for ft in index.files.values():
        assert ft.kind in ("a", "r") and 0 <= ft.base <= ft.size
        assert all(p.pos >= 0 and p.length >= 0 and p.seq in index.bodies for p in ft.pieces)


@settings(max_examples=300, **_COMMON)
@given(hostile_bytes)
def test_any_tail_bytes_decode_or_are_corrupt(data: bytes) -> None:
    """Random, mutated and shaped tail objects decode to a checked index or CorruptObjectError."""
    _decodes_or_corrupt(data)


@pytest.mark.slow
@settings(max_examples=5000 * LONG, **_COMMON)
@given(hostile_bytes)
def test_any_tail_bytes_decode_or_are_corrupt_long(data: bytes) -> None:
    """The long run of :func:`test_any_tail_bytes_decode_or_are_corrupt`."""
    _decodes_or_corrupt(data)


# ── Readers over a bucket (MemoryStorage) ─────────────────────────────────────


@pytest.fixture
def bucket() -> Iterator[str]:
    name = f"hostile-{uuid.uuid4().hex}"
    yield name
    drop_bucket(name)


def put_raw(bucket: str, key: str, data: bytes) -> None:
    """Store bytes at any key, as a hostile host (or a buggy tool) can."""
    b = memory_bucket(bucket)
    with b.lock:
        b.put(key, data)


def make_host(storage: MemoryStorage, host: str, run_id: str) -> EvalStore:
    store = EvalStore(storage, host)
    store.create_run("m", ["gsm8k"], run_id=run_id)
    return store


_VALUES = st.one_of(
    st.integers(-2, 2**64),
    st.integers(-(10**400), 10**400),
    st.sampled_from([0, 1, 7, 2**42, 5 * 1024**4, 5 * 1024**4 + 1, True, False, None]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.sampled_from(["a", "r", "x"]),
)
_PIECES = st.lists(
    st.one_of(st.lists(_VALUES, min_size=3, max_size=3), st.lists(_VALUES, max_size=4), _VALUES),
    max_size=3,
)
_ENTRIES = st.one_of(
    st.fixed_dictionaries(
        {"k": _VALUES, "size": _VALUES, "base": _VALUES, "mtime": _VALUES},
        optional={"p": _PIECES, "mv": st.one_of(st.none(), st.text(max_size=3), _VALUES)},
    ),
    _VALUES,
)


@given(entry=_ENTRIES, seq=st.integers(0, 3))
@example(entry={"k": "a", "size": 9, "base": 2, "mtime": 1.5, "p": [[0, 0, 3], [1, 4, 4]]}, seq=1)
@example(entry={"k": "r", "size": 3, "base": 0, "mtime": 2, "mv": "v1", "p": [[2, 0, 3]]}, seq=1)
@example(entry={"k": "a", "size": 3, "base": 0, "mtime": 1.0, "p": [[0, 0, True]]}, seq=0)
@example(entry={"k": "a", "size": 3, "base": 0, "mtime": float("inf"), "p": []}, seq=0)
@settings(max_examples=600, deadline=None)
def test_a_tail_entry_reads_the_same_through_the_fast_and_the_checked_path(
    entry: Any, seq: int
) -> None:
    """The one-pass check of an index entry accepts exactly what the field-by-field check
    accepts, builds the same entry, and leaves every error to it (the same message)."""
    results = []
    for read in (tail_module._file_tail, tail_module._file_tail_checked):
        try:
            results.append(read("runs/r/x.jsonl", entry, seq))
        except ValueError as exc:
            results.append(str(exc))
    assert results[0] == results[1]


def test_damaged_tail_is_read_around_and_reported_by_every_reader(bucket: str) -> None:
    """A host whose newest tail object is damaged: its plain runs are read, the damage is named
    (EvalStore warns, Fleet reports kind "damaged" with the object's URL), other hosts unaffected."""
    with MemoryStorage(bucket, "fleet") as storage:
        make_host(storage, "good", "g1")
        make_host(storage, "bad", "b1")
        name = object_name(7)
        put_raw(bucket, f"fleet/bad/.evalsyncd/tail/{name}", bomb(32 << 20))
        tail_url = f"memory://{bucket}/fleet/bad/.evalsyncd/tail/{name}"

        bad = EvalStore(storage, "bad")
        assert [r.run_id for r in bad.list_runs()] == ["b1"]
        assert bad.read_run("b1").run_id == "b1"
        damage = bad._reads.sync(tail_damage(bad.storage))
        assert isinstance(damage, CorruptObjectError) and damage.url == tail_url

        listing = Fleet(storage).list_runs()
        assert sorted((r.host, r.run_id) for r in listing.runs) == [("bad", "b1"), ("good", "g1")]
        assert listing.ok and not listing.failed
        [problem] = listing.skipped
        assert (problem.host, problem.kind, problem.url) == ("bad", "damaged", tail_url)
        assert tail_url in problem.message

        found, problems = Fleet(storage).find_run("b1")
        assert [r.host for r in found] == ["bad"]
        assert [(p.host, p.kind) for p in problems] == [("bad", "damaged")]


def test_piece_past_its_object_end_is_read_around_and_reported(bucket: str) -> None:
    """An index placing a piece past the end of its tail object: that file reads as its plain
    object, and tail_damage names the tail object and the range."""
    with MemoryStorage(bucket, "h") as storage:
        storage.write("runs/r/t.jsonl", b"main\n")
        storage.write("runs/r/only-in-tail.jsonl", b"")
        storage.remove("runs/r/only-in-tail.jsonl")
        files = {
            "runs/r/t.jsonl": FileTail("a", 105, 5, None, 1.0, (Piece(0, 0, 100),)),
            "runs/r/only-in-tail.jsonl": FileTail("a", 100, 0, None, 1.0, (Piece(0, 0, 100),)),
        }
        data, _ = encode_tail_object(TailIndex("w", 0, 1.0, files), b"x" * 10)  # not 100
        put_raw(bucket, f"h/.evalsyncd/tail/{object_name(0)}", data)
        with MemoryStorage(bucket, "h") as reader:
            assert reader.read("runs/r/t.jsonl") == b"main\n"
            with pytest.raises(FileNotFoundError):
                reader.read("runs/r/only-in-tail.jsonl")
            damage = EvalStore(reader)._reads.sync(tail_damage(reader))
        assert isinstance(damage, CorruptObjectError)
        assert object_name(0) in str(damage) and "holds 10 of them" in str(damage)


JSON_BYTES = (
    st.binary(max_size=300)
    | st.builds(lambda v: json.dumps(v).encode(), json_values)
    | st.builds(
        lambda v: json.dumps(
            {
                "run_id": "r",
                "model_name": v,
                "checkpoint_path": None,
                "checkpoint_name": v,
                "benchmarks": v,
                "timestamp": v,
                "scores": v,
            }
        ).encode(),
        json_values,
    )
    | st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n)
    | st.just(b'{"run_id": "\xff\xfe"}')
)


def _read_everything(storage: MemoryStorage) -> None:
    """Every read a user makes of host ``h``: a value, or an error of the tree."""
    from evalsyncd.runs import format_run, format_runs, run_details

    store = EvalStore(storage, "h")
    for call in (
        store.list_runs,
        store.runs_checked,
        lambda: store.read_run("r"),
        lambda: store.read_summary("r"),
        lambda: store.read_result("r", "gsm8k"),
        lambda: format_runs([r.to_dict() for r in store.list_runs()]),
        lambda: format_run({"host": "h", **run_details(store, "r")}),
        lambda: Fleet(storage).list_runs(),
    ):
        with contextlib.suppress(EvalsyncdError, FileNotFoundError):
            call()


@settings(max_examples=60, **_COMMON)
@given(metadata=JSON_BYTES, catalog=JSON_BYTES, result=JSON_BYTES, summary=JSON_BYTES)
def test_any_metadata_catalog_and_results_read_or_raise_from_the_tree(
    bucket: str, metadata: bytes, catalog: bytes, result: bytes, summary: bytes
) -> None:
    """Hostile metadata.json, catalog, result.json and summary.json: readers return or raise
    an error of the tree (no KeyError, TypeError, RecursionError, UnicodeDecodeError)."""
    with MemoryStorage(bucket) as storage:
        put_raw(bucket, "h/runs/r/metadata.json", metadata)
        put_raw(bucket, "h/runs/r/summary.json", summary)
        put_raw(bucket, "h/runs/r/gsm8k/result.json", result)
        put_raw(bucket, f"h/.evalsyncd/{CATALOG_NAME}", catalog)
        _read_everything(storage)
        put_raw(bucket, f"h/.evalsyncd/{CATALOG_NAME}", build_catalog({"r": metadata}))
        _read_everything(storage)


def test_oversized_json_files_are_refused_before_download(bucket: str) -> None:
    """metadata.json / summary.json / the catalog past their limits: one bounded read, then
    CorruptObjectError naming the URL and the limit (list_runs skips and reports the run)."""
    with MemoryStorage(bucket) as storage:
        make_host(storage, "h", "ok")
        big = b'{"pad": "' + b"a" * MAX_JSON_BYTES + b'"}'
        put_raw(bucket, "h/runs/r/metadata.json", big)
        put_raw(bucket, "h/runs/ok/summary.json", big)
        put_raw(bucket, f"h/.evalsyncd/{CATALOG_NAME}", b" " * (MAX_CATALOG_BYTES + 10))
        store = EvalStore(storage, "h")
        runs, skipped = store.runs_checked()
        assert [r.run_id for r in runs] == ["ok"]
        [s] = skipped
        assert s.url == storage.url("h/runs/r/metadata.json")
        assert f"limit of {MAX_JSON_BYTES} bytes" in s.reason
        with pytest.raises(
            CorruptObjectError, match=f"summary.json: larger than the limit of {MAX_JSON_BYTES}"
        ):
            store.read_summary("ok")
        with pytest.raises(CorruptObjectError, match=r"metadata\.json"):
            store.read_run("r")
        listing = Fleet(storage).list_runs()
        assert [(p.kind, p.url) for p in listing.skipped] == [("skipped", s.url)]


def test_parse_catalog_refuses_deep_nesting_and_bad_run_ids() -> None:
    """A catalog nested too deeply, or naming a run id with '/', is a CatalogError."""
    from evalsyncd.catalog import CatalogError

    with pytest.raises(CatalogError, match="nested too deeply"):
        parse_catalog(b"[" * 100_000 + b"]" * 100_000, "u")
    doc = {"format": "evalsyncd-catalog", "version": 1, "runs": {"a/../b": {}}}
    with pytest.raises(CatalogError, match="invalid run id"):
        parse_catalog(json.dumps(doc).encode(), "u")


def test_a_line_longer_than_the_limit_is_dropped_as_it_arrives() -> None:
    """A JSONL line past max_line_bytes is skipped (warning), holding at most the limit."""
    from evalsyncd.store.layout import LineSplitter

    lines = LineSplitter("u", max_line_bytes=64)
    got = list(lines.feed(b'{"a": 1}\n{"pad": "'))
    for _ in range(100):
        got += lines.feed(b"x" * 50)
        assert len(lines._partial) <= 64 + 50
    got += lines.feed(b'"}\n' + b"y" * 70 + b'\n{"c": 3}\n')
    lines.close()
    assert got == [{"a": 1}, {"c": 3}] and lines.lineno == 4


def test_hostile_names_in_a_fleet_are_skipped_and_named(bucket: str) -> None:
    """A host name that is no valid prefix, a metadata.json whose run_id would escape, a
    non-run-id name under runs/: each is reported (kind "skipped", URL and reason); the
    good run is listed."""
    with MemoryStorage(bucket) as storage:
        make_host(storage, "good", "r1")
        evil = {"run_id": "../x", "model_name": "m", "checkpoint_path": None}
        evil |= {"checkpoint_name": None, "benchmarks": [], "timestamp": "t"}
        put_raw(bucket, "good/runs/r2/metadata.json", json.dumps(evil).encode())
        put_raw(bucket, "good/runs/a\\b/metadata.json", b"{}")
        put_raw(bucket, "a//b/runs/x/metadata.json", b"{}")
        listing = Fleet(storage).list_runs()
    assert [(r.host, r.run_id) for r in listing.runs] == [("good", "r1")]
    reasons = {p.url: p.message for p in listing.skipped}
    assert (
        "'run_id' has a wrong type or value" in reasons[storage.url("good/runs/r2/metadata.json")]
    )
    assert "not a valid run id" in reasons[storage.url("good/runs/a\\b")]
    assert all(p.kind == "skipped" for p in listing.skipped) and listing.ok


@settings(max_examples=60, **_COMMON)
@given(data=hostile_bytes, seq=st.integers(0, 60))
def test_any_tail_object_in_a_bucket_reads_or_raises_from_the_tree(
    bucket: str, data: bytes, seq: int
) -> None:
    """A random or mutated newest tail object under a host with one run: every read of the
    host (listing, stitched reads, Fleet) returns or raises an error of the tree."""
    with MemoryStorage(bucket) as storage:
        make_host(storage, "h", "r")
        put_raw(bucket, f"h/.evalsyncd/tail/{object_name(seq)}", data)
        host = storage.child("h")
        for call in (
            lambda: host.read("runs/r/metadata.json"),
            lambda: host.read_range("runs/r/gsm8k/trajectories.jsonl", 0, 10),
            lambda: host.list_dir("runs"),
            lambda: host.stat("runs/r/metadata.json"),
        ):
            with contextlib.suppress(EvalsyncdError, FileNotFoundError):
                call()
        _read_everything(storage)
        listing = Fleet(storage).list_runs()
        assert [r.run_id for r in listing.runs] in (["r"], [])
