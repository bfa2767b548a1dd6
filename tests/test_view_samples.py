"""``evalsyncd view``: the samples, one-sample and compare pages, their JSON twins and errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from evalsyncd.catalog import build_catalog, write_catalog_bytes
from evalsyncd.storage import LocalStorage
from evalsyncd.storage.memory import MemoryStorage
from evalsyncd.store import EvalStore, StoredTrajectory, StoredTurn
from evalsyncd.view.samples_pages import MAX_PAGE_SIZE, TEXT_LIMIT
from tests.viewhelpers import HOSTILE, Page, fetch, with_view, write_run

Get = Callable[..., Awaitable[Page]]

BASE = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
CAND = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[LocalStorage, str, str]:
    """One host with two runs of gsm8k (8 samples each; B has an error at idx 5)."""
    root = tmp_path / "fleet"
    store = EvalStore(root / "h")
    a = write_run(store, "m", "step100", rewards=BASE, answers={1: "42\nsix times seven"})
    b = write_run(
        store,
        "m",
        "step200",
        rewards=CAND,
        errors={5: "timeout"},
        answers={1: "41\nsix times seven"},
    )
    return LocalStorage(root, mkdir=False), a, b


def _samples(page: Page) -> list[int]:
    return [s["idx"] for s in page.json()["samples"]]


def test_samples_page_filters_pages_and_json(pair: tuple[LocalStorage, str, str]) -> None:
    """The reference filters, paging by number, counts; the HTML rows match the JSON twin."""
    storage, _, b = pair
    q = f"/samples?host=h&run={b}&benchmark=gsm8k"
    pages = fetch(
        storage,
        "",
        q,
        q + "&format=json",
        q + "&format=json&filter=correct",
        q + "&format=json&filter=incorrect",
        q + "&format=json&filter=errors",
        q + "&format=json&size=3&page=2",
        q + "&format=json&size=3&page=9",
        q + "&filter=bogus",
        q + f"&size={MAX_PAGE_SIZE + 1}",
    )
    html, all_, correct, incorrect, errors, page2, beyond, bad_filter, too_big = pages
    assert html.status == 200 and html.text.count('class="sample"') == 8
    data = all_.json()
    assert data["counts"] == {"all": 8, "correct": 5, "incorrect": 2, "errors": 1}
    assert _samples(all_) == list(range(8))
    assert _samples(correct) == [0, 2, 3, 4, 6]
    assert _samples(incorrect) == [1, 7]
    assert _samples(errors) == [5] and errors.json()["samples"][0]["error"] == "timeout"
    assert _samples(page2) == [3, 4, 5] and page2.json()["pages"] == 3
    assert _samples(beyond) == []
    assert bad_filter.status == 400 and "unknown filter" in bad_filter.text
    assert too_big.status == 400


def test_search_text_and_regex(pair: tuple[LocalStorage, str, str]) -> None:
    """Text and regex search over the samples' contents, combined with a filter."""
    storage, a, _ = pair
    q = f"/samples?host=h&run={a}&benchmark=gsm8k&format=json"
    text, regex, both, bad = fetch(
        storage,
        "",
        q + "&q=six+times",
        q + "&q=answer+is+[67]&regex=1",
        q + "&q=answer+is&filter=incorrect",
        q + "&q=(unclosed&regex=1",
    )
    assert _samples(text) == [1]
    assert _samples(regex) == [6, 7]
    assert _samples(both) == [2, 3, 5]
    assert bad.status == 400


def test_one_sample_and_load_more(tmp_path: Path) -> None:
    """One sample's turns, reward, metrics and error; a long turn cut, the rest on demand."""
    root = tmp_path / "fleet"
    store = EvalStore(root / "h")
    long_text = "x" * (TEXT_LIMIT * 3) + "END"
    run_id = write_run(
        store, "m", "s", rewards=[0.0, 1.0], answers={1: long_text}, errors={0: "boom"}
    )
    storage = LocalStorage(root, mkdir=False)
    base = f"host=h&run={run_id}&benchmark=gsm8k"
    html0, html1, js1, more, missing = fetch(
        storage,
        "",
        f"/sample?{base}&line=0",
        f"/sample?{base}&line=1",
        f"/sample?{base}&line=1&format=json",
        f"/sample/text?{base}&line=1&field=turn:1&offset={TEXT_LIMIT}",
        f"/sample?{base}&line=99",
    )
    assert html0.status == 200 and "boom" in html0.text and "question 0" in html0.text
    assert long_text not in html1.text and "load more" in html1.text
    assert f"showing {TEXT_LIMIT} of {len(long_text)} characters" in html1.text
    turn = js1.json()["sample"]["turns"][1]
    assert turn["truncated"] and turn["content_length"] == len(long_text)
    rest = more.json()
    assert rest["text"] == long_text[TEXT_LIMIT:] and rest["next"] is None
    assert missing.status == 404 and 'id="error"' in missing.text


def test_hostile_trajectories_are_text_and_bad_lines_are_messages(tmp_path: Path) -> None:
    """Script, textarea breakers, javascript: links and invalid UTF-8 in a trajectory file."""
    root = tmp_path / "fleet"
    store = EvalStore(root / "h")
    run_id = store.create_run(HOSTILE, ["b"], checkpoint_name="c")
    evil = '</textarea></pre><script>alert(1)</script><a href="javascript:alert(2)">x</a>'
    store.write_trajectory(
        run_id,
        "b",
        StoredTrajectory(
            idx=0,
            benchmark="b",
            example_id=evil,
            turns=[StoredTurn("assistant", evil)],
            reward=0.0,
            error=evil,
            logs={"html": evil},
        ),
    )
    path = root / "h" / "runs" / run_id / "b" / "trajectories.jsonl"
    with path.open("ab") as f:
        f.write(b'{"idx": 1, "benchmark": "b", "example_id": "\xff\xfe bad utf-8"}\n')
        f.write(b"not json at all\n")
    storage = LocalStorage(root, mkdir=False)
    q = f"host=h&run={run_id}&benchmark=b"
    pages = fetch(
        storage,
        "",
        f"/samples?{q}",
        f"/sample?{q}&line=0",
        f"/sample?{q}&line=1",
        f"/sample?{q}&line=2",
        f"/samples?{q}&q=%3Cscript%3E",
    )
    listing, sample, bad_utf8, not_json, search = pages
    for page in (listing, sample, search):
        assert page.status == 200, page.text
        assert "<script>alert(1)" not in page.text and HOSTILE not in page.text
        assert 'href="javascript:' not in page.text
        assert "</textarea></pre><script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in sample.text
    # invalid UTF-8 inside a JSON string: the sample shows, the bytes replaced
    assert bad_utf8.status == 200 and "\ufffd" in bad_utf8.text
    assert not_json.status == 404 and 'id="error"' in not_json.text and "line" in not_json.text


def _surrogate_run(root: Path) -> str:
    store = EvalStore(root / "h")
    run_id = store.create_run("m", ["b"], checkpoint_name="c")
    store.write_trajectory(run_id, "b", StoredTrajectory(idx=0, benchmark="b", reward=1.0))
    path = root / "h" / "runs" / run_id / "b" / "trajectories.jsonl"
    line = {"idx": 1, "benchmark": "b", "example_id": "lone \udc80", "turns": []}
    with path.open("ab") as f:
        f.write(json.dumps(line).encode() + b"\n")  # valid JSON: "\udc80"
    return run_id


def test_a_lone_surrogate_never_crashes_the_view(tmp_path: Path) -> None:
    """JSON text holding a lone surrogate: a page or a clear message, never a 500; serving goes on."""
    run_id = _surrogate_run(tmp_path / "fleet")
    q = f"host=h&run={run_id}&benchmark=b"
    storage = LocalStorage(tmp_path / "fleet", mkdir=False)
    listing, one, after = fetch(storage, "", f"/samples?{q}", f"/sample?{q}&line=1", "/")
    for page in (listing, one):
        assert page.status < 500
        assert page.status == 200 or 'id="error"' in page.text
    assert after.status == 200


def test_a_lone_surrogate_sample_is_shown(tmp_path: Path) -> None:
    """The sample with a lone surrogate is listed and shown (the character replaced)."""
    run_id = _surrogate_run(tmp_path / "fleet")
    q = f"host=h&run={run_id}&benchmark=b"
    storage = LocalStorage(tmp_path / "fleet", mkdir=False)
    listing, one = fetch(storage, "", f"/samples?{q}&format=json", f"/sample?{q}&line=1")
    assert listing.status == 200 and len(listing.json()["samples"]) == 2
    assert one.status == 200


def test_compare_counts_test_and_pair_diff(pair: tuple[LocalStorage, str, str]) -> None:
    """Categories, counts, McNemar p, bootstrap CI; one pair side by side with a diff."""
    storage, a, b = pair
    q = f"benchmark=gsm8k&a_host=h&a={a}&b_host=h&b={b}"
    html, js, regressions, bform = fetch(
        storage,
        "",
        f"/compare?{q}",
        f"/compare?{q}&format=json",
        f"/compare?{q}&format=json&category=regression",
        f"/compare?benchmark=gsm8k&a_host=h&a={a}&b=h/{b}&format=json",
    )
    data = js.json()
    assert data["counts"]["regression"] == 2  # idx 1, 7
    assert data["counts"]["improvement"] == 2  # idx 2, 3
    assert data["samples"] == {"a": 8, "b": 8}
    assert 0.0 < data["mcnemar_p"] <= 1.0
    low, high = data["reward_diff_ci"]
    assert low <= high
    assert sorted(r["idx"] for r in regressions.json()["rows"]) == [1, 7]
    assert bform.json()["counts"] == data["counts"]
    assert 'id="mcnemar-p"' in html.text and 'data-category="regression"' in html.text
    row = next(r for r in regressions.json()["rows"] if r["idx"] == 1)
    pair_q = f"{q}&a_line={row['a']['line']}&b_line={row['b']['line']}"
    page, pj = fetch(storage, "", f"/compare/pair?{pair_q}", f"/compare/pair?{pair_q}&format=json")
    assert page.status == 200 and 'id="diff"' in page.text
    assert "-42" in "\n".join(pj.json()["diff"]) and "+41" in "\n".join(pj.json()["diff"])
    assert pj.json()["same_answer"] is False


def test_missing_things_are_messages(pair: tuple[LocalStorage, str, str]) -> None:
    """A missing run or benchmark, a missing side of a comparison: messages, serving goes on."""
    storage, a, _ = pair
    pages = fetch(
        storage,
        "",
        "/samples?host=h&run=nope&benchmark=gsm8k",
        f"/samples?host=h&run={a}&benchmark=nope&format=json",
        f"/compare?benchmark=gsm8k&a_host=h&a={a}&b_host=h&b=nope&format=json",
        f"/samples?host=h&run={a}&benchmark=gsm8k",
    )
    for page in pages[:3]:
        assert page.status in (200, 404), page.text
    assert pages[3].status == 200


def test_samples_fragment_shows_appended_samples(tmp_path: Path) -> None:
    """A running eval's new samples appear in the samples page's live fragment."""
    root = tmp_path / "fleet"
    store = EvalStore(root / "h")
    run_id = write_run(store, "m", "s", rewards=[1.0], finalize=False)
    storage = LocalStorage(root, mkdir=False)
    url = f"/samples?host=h&run={run_id}&benchmark=gsm8k&fragment=1"

    async def scenario(get: Get) -> None:
        first = await get(url)
        assert first.text.count('class="sample"') == 1 and "<html" not in first.text
        store.write_trajectory(
            run_id, "gsm8k", StoredTrajectory(idx=1, benchmark="gsm8k", reward=0.0)
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            page = await get(url)
            if 'data-line="1"' in page.text:
                break
            await asyncio.sleep(0.05)
        assert 'data-line="1"' in page.text

    with_view(storage, "", scenario, refresh_s=0.1)


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_samples_and_compare_on_a_bucket(backend: str, request: pytest.FixtureRequest) -> None:
    """On S3 / GCS: a host's samples page, one sample, and a comparison."""
    storage = request.getfixturevalue(f"{backend}_storage")
    store = EvalStore(storage.child("host-a"))
    a = write_run(store, "m", "s1", rewards=BASE)
    b = write_run(store, "m", "s2", rewards=CAND)
    samples, one, comp = fetch(
        storage,
        "",
        f"/samples?host=host-a&run={a}&benchmark=gsm8k&format=json&filter=incorrect",
        f"/sample?host=host-a&run={a}&benchmark=gsm8k&line=3&format=json",
        f"/compare?benchmark=gsm8k&a_host=host-a&a={a}&b_host=host-a&b={b}&format=json",
    )
    assert _samples(samples) == [2, 3, 5]
    assert one.json()["sample"]["idx"] == 3
    assert comp.json()["counts"]["regression"] == 2


def test_reads_only_and_no_request_per_run(memory_storage: MemoryStorage) -> None:
    """Every page writes nothing; the runs list costs a few requests per host, none per run."""
    hosts = ("h1", "h2", "h3")
    runs: dict[str, str] = {}
    for host in hosts:
        child = memory_storage.child(host)
        store = EvalStore(child)
        ids = [write_run(store, "m", f"step{k}", rewards=BASE) for k in range(4)]
        runs[host] = ids[0]
        metadata = {i: child.read(f"runs/{i}/metadata.json") for i in ids}
        write_catalog_bytes(child, build_catalog(metadata))
    faults = memory_storage.faults
    faults.calls.clear()
    (listing,) = fetch(memory_storage, "", "/?format=json")
    assert listing.json()["total"] == 4 * len(hosts)
    assert faults.calls["read"] == 0  # no metadata.json read: the catalogs answer
    # per host 3: runs/, its catalog, its tail log's LIST; once: the fleet prefix's LIST
    # and the tail log's LIST at each prefix level from the fleet prefix up (a reader's
    # storage may sit below a destination: storage/_tailfind.py)
    from evalsyncd.storage._tailfind import search_levels

    once = 1 + len(search_levels(memory_storage.prefix, memory_storage.prefix, 0))
    assert sum(faults.calls.values()) <= once + 3 * len(hosts), dict(faults.calls)
    h = hosts[0]
    a, b = runs[h], runs[hosts[1]]
    pages = fetch(
        memory_storage,
        "",
        "/",
        "/checkpoints",
        f"/run?host={h}&run={a}",
        f"/samples?host={h}&run={a}&benchmark=gsm8k",
        f"/samples?host={h}&run={a}&benchmark=gsm8k&q=answer",
        f"/sample?host={h}&run={a}&benchmark=gsm8k&line=2",
        f"/compare?benchmark=gsm8k&a_host={h}&a={a}&b_host={hosts[1]}&b={b}",
        f"/compare/pair?benchmark=gsm8k&a_host={h}&a={a}&b_host={hosts[1]}&b={b}&a_line=1&b_line=1",
    )
    assert [p.status for p in pages] == [200] * len(pages)
    for op in ("write", "append", "remove", "internal_put", "internal_create", "delete_keys"):
        assert faults.calls[op] == 0, op
