"""Interop with the reference ``tinker_cookbook.stores.eval_store`` (tinker-cookbook 0.6.1).

The committed ``tests/fixtures/reference_tree/`` and ``reference_reads.json``
were produced by the reference code (``tests/fixtures/generate_reference_tree.py``).
When the reference itself is available (``TINKER_COOKBOOK_SOURCE`` names its
wheel or unpacked package, or ``tinker_cookbook`` is installed), the tests also
run it live.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import evalsyncd.store as store_module
from evalsyncd.storage import AnyStorage, LocalStorage, Storage
from evalsyncd.store import EvalStore
from tests.fixtures.generate_reference_tree import (
    READS,
    TREE,
    Clock,
    load_reference,
    patched_reference_clock,
    reads,
    scenario,
)

EXPECTED: dict[str, Any] = json.loads(READS.read_text("utf-8"))


def _reference_source() -> Path | None:
    env = os.environ.get("TINKER_COOKBOOK_SOURCE")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("tinker_cookbook")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


needs_reference = pytest.mark.skipif(
    _reference_source() is None,
    reason="the reference package is not available (set TINKER_COOKBOOK_SOURCE)",
)


def walk(storage: Storage, prefix: str = "") -> Iterator[str]:
    """Relative paths of every file under ``prefix``, depth first."""
    for name in storage.list_dir(prefix):
        path = f"{prefix}/{name}" if prefix else name
        if storage.exists(path):
            yield path
        else:
            yield from walk(storage, path)


def committed_tree() -> dict[str, bytes]:
    return {
        p.relative_to(TREE).as_posix(): p.read_bytes()
        for p in sorted(TREE.rglob("*"))
        if p.is_file()
    }


def upload(storage: Storage, tree: dict[str, bytes]) -> None:
    for path, data in tree.items():
        storage.write(path, data)


def expected_reads() -> dict[str, Any]:
    return {k: v for k, v in EXPECTED.items() if k != "generator"}


def our_reads(store: EvalStore) -> dict[str, Any]:
    # Round-trip through JSON so tuples/ints compare as the committed file does.
    got: dict[str, Any] = json.loads(json.dumps(reads(store, EXPECTED["ids"]), sort_keys=True))
    return got


def write_with_ours(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(store_module, "_now", lambda: clock.now)
    monkeypatch.setattr(store_module, "_short_id", lambda: clock.short_id)
    ids = scenario(EvalStore(storage), store_module, clock)
    assert ids == EXPECTED["ids"]


def test_reads_reference_tree(storage: AnyStorage) -> None:
    """Our EvalStore reads a tree written by the reference exactly as the reference does."""
    upload(storage, committed_tree())
    got = our_reads(EvalStore(storage))
    want = expected_reads()
    # Ours orders list_runs by timestamp (most recent first); the reference by
    # run id, descending. Same runs, same contents.
    assert got.pop("list_runs_order") == ["base_20240504_235959_ffffff", "manual-run",
                                          "step100_20240501_100000_a1b2c3"]  # fmt: skip
    assert sorted(want.pop("list_runs_order")) == sorted(got["list_runs"])
    assert got == want


def test_writes_reference_bytes(storage: AnyStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same calls through our EvalStore leave the same files, byte for byte, as the reference."""
    write_with_ours(storage, monkeypatch)
    got = {path: storage.read(path) for path in walk(storage)}
    want = committed_tree()
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path] == want[path], path


def test_reference_fixture_is_current(tmp_path: Path) -> None:
    """The committed reads file describes the committed tree (run ids, runs.jsonl lines)."""
    index = [json.loads(line) for line in (TREE / "runs.jsonl").read_bytes().splitlines()]
    assert [r["run_id"] for r in index] == [
        EXPECTED["ids"][k] for k in ("step100", "manual", "deleted", "base")
    ]
    assert set(EXPECTED["list_runs"]) == {p.name for p in (TREE / "runs").iterdir()}


@needs_reference
def test_reference_reads_our_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The live reference EvalStore reads a tree written by ours exactly as it reads its own."""
    source = _reference_source()
    assert source is not None
    ref = load_reference(source)
    write_with_ours(LocalStorage(tmp_path / "ours"), monkeypatch)
    got = json.loads(json.dumps(reads(ref.EvalStore(ref.LocalStorage(tmp_path / "ours")),
                                      EXPECTED["ids"]), sort_keys=True))  # fmt: skip
    assert got == expected_reads()


@needs_reference
def test_reference_regenerates_committed_tree(tmp_path: Path) -> None:
    """Running the generator on the live reference reproduces the committed fixture bytes."""
    source = _reference_source()
    assert source is not None
    ref = load_reference(source)
    storage = ref.LocalStorage(tmp_path / "ref")
    clock = Clock()
    with patched_reference_clock(ref, clock):
        ids = scenario(ref.EvalStore(storage), ref, clock)
    assert ids == EXPECTED["ids"]
    root = tmp_path / "ref"
    got = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert got == committed_tree()
