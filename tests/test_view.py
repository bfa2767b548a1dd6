"""``evalsyncd view``: the runs, checkpoint and run pages, their JSON twins, security, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

import pytest

from evalsyncd.storage import LocalStorage
from evalsyncd.store import BenchmarkResult, EvalStore
from evalsyncd.view import ViewSource
from evalsyncd.view.app import CONTENT_SECURITY_POLICY
from tests.viewhelpers import HOSTILE, Page, fetch, view_server, with_view, write_run

Get = Callable[..., Awaitable[Page]]


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[LocalStorage, dict[str, str]]:
    """A local fleet: host-a (two checkpoints of m1), host-b (m2, one running run)."""
    root = tmp_path / "fleet"
    a, b = EvalStore(root / "host-a"), EvalStore(root / "host-b")
    runs = {
        "a20": write_run(a, "m1", "step20", rewards=[1, 0, 0, 0]),
        "a100": write_run(a, "m1", "step100", rewards=[1, 1, 1, 0]),
        "b5": write_run(b, "m2", "step5", rewards=[1, 1, 0, 0]),
        "brun": write_run(b, "m2", "step9", rewards=[1], finalize=False),
    }
    return LocalStorage(root, mkdir=False), runs


def test_runs_page_lists_every_host_with_scores_and_status(
    fleet: tuple[LocalStorage, dict[str, str]],
) -> None:
    """The runs page and its JSON twin show every host's runs, scores, and running/finalized."""
    storage, runs = fleet
    html, js = fetch(storage, "", "/", "/?format=json")
    assert html.status == 200 and html.headers["Content-Type"].startswith("text/html")
    for run_id in runs.values():
        assert f'data-run-id="{run_id}"' in html.text
    assert re.search(rf'data-run-id="{runs["a100"]}"[^>]*data-status="finalized"', html.text)
    assert re.search(rf'data-run-id="{runs["brun"]}"[^>]*data-status="running"', html.text)
    data = js.json()
    assert data["total"] == 4 and data["hosts"] == ["host-a", "host-b"] and data["problems"] == []
    by_id = {r["run_id"]: r for r in data["runs"]}
    assert by_id[runs["a100"]]["scores"] == {"gsm8k": 0.75}
    assert by_id[runs["a100"]]["host"] == "host-a"
    assert by_id[runs["brun"]]["status"] == "running" and by_id[runs["brun"]]["scores"] == {}


def test_runs_filters_and_sorts(fleet: tuple[LocalStorage, dict[str, str]]) -> None:
    """Text, model, host, benchmark and status filters, and sorting by a benchmark's score."""
    storage, runs = fleet
    pages = fetch(
        storage,
        "",
        "/?format=json&q=STEP1",
        "/?format=json&model=m2",
        "/?format=json&host=host-a",
        "/?format=json&benchmark=nope",
        "/?format=json&status=running",
        "/?format=json&sort=score:gsm8k&order=desc",
        "/?format=json&sort=checkpoint&order=asc&model=m1",
        "/?format=json&sort=bogus",
    )
    ids = [[r["run_id"] for r in p.json().get("runs", [])] for p in pages]
    assert ids[0] == [runs["a100"]]
    assert set(ids[1]) == {runs["b5"], runs["brun"]}
    assert set(ids[2]) == {runs["a20"], runs["a100"]}
    assert ids[3] == [] and pages[3].json()["total"] == 4
    assert ids[4] == [runs["brun"]]
    assert ids[5][:3] == [runs["a100"], runs["b5"], runs["a20"]]
    assert ids[6] == [runs["a20"], runs["a100"]]  # step20 before step100: natural order
    assert pages[7].status == 400 and "unknown sort" in pages[7].json()["error"]


def test_runs_live_fragment_shows_new_runs_and_scores(tmp_path: Path) -> None:
    """A run created (and later finalized) while the page is open shows in its live fragment."""
    root = tmp_path / "fleet"
    store = EvalStore(root / "h1")
    write_run(store, "m1", "step1")
    storage = LocalStorage(root, mkdir=False)

    async def scenario(get: Get) -> None:
        first = await get("/?fragment=1")
        assert first.status == 200 and first.text.count('class="run"') == 1
        assert "<html" not in first.text  # a fragment, not a page
        run_id = write_run(store, "m1", "step2", rewards=[1.0, 1.0], finalize=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            page = await get("/?fragment=1")
            if f'data-run-id="{run_id}"' in page.text:
                break
            await asyncio.sleep(0.05)
        assert f'data-run-id="{run_id}" data-host="h1" data-status="running"' in page.text
        store.write_result(
            run_id, BenchmarkResult(name="gsm8k", score=1.0, num_examples=2, num_correct=2)
        )
        store.finalize_run(run_id)
        while time.monotonic() < deadline:
            page = await get("/?fragment=1")
            if f'data-run-id="{run_id}" data-host="h1" data-status="finalized"' in page.text:
                break
            await asyncio.sleep(0.05)
        assert 'data-score="1.0"' in page.text

    with_view(storage, "", scenario, refresh_s=0.1)


def test_checkpoint_page_orders_naturally_and_links_points_to_runs(
    fleet: tuple[LocalStorage, dict[str, str]],
) -> None:
    """Score by checkpoint: step20 before step100, the runs report's numbers, points open the run."""
    storage, runs = fleet
    html, js = fetch(storage, "", "/checkpoints", "/checkpoints?format=json")
    series = js.json()["benchmarks"]["gsm8k"]
    assert [p["checkpoint"] for p in series["m1"]] == ["step20", "step100"]
    assert [p["score"] for p in series["m1"]] == [0.25, 0.75]
    assert f'href="/run?host=host-a&amp;run={runs["a100"]}"' in html.text
    assert 'data-checkpoint="step100" data-score="0.75"' in html.text
    # the unfinalized run has no score: not plotted
    assert runs["brun"] not in html.text


def test_run_page_shows_results_samples_link_and_compare_choices(
    fleet: tuple[LocalStorage, dict[str, str]],
) -> None:
    """One run: metadata, per-benchmark result, a samples link, the other runs to compare with."""
    storage, runs = fleet
    html, js = fetch(
        storage,
        "",
        f"/run?host=host-a&run={runs['a20']}",
        f"/run?host=host-a&run={runs['a20']}&format=json",
    )
    assert html.status == 200
    assert f'href="/samples?host=host-a&amp;run={runs["a20"]}&amp;benchmark=gsm8k"' in html.text
    assert f'<option value="host-b/{runs["b5"]}">' in html.text
    data = js.json()
    assert data["run"]["model_name"] == "m1" and data["run"]["status"] == "finalized"
    assert data["results"]["gsm8k"]["num_correct"] == 1
    assert data["benchmarks"] == ["gsm8k"]


def test_security_headers_on_pages_static_files_and_errors(
    fleet: tuple[LocalStorage, dict[str, str]],
) -> None:
    """CSP without inline script, nosniff and no framing on every response, errors included."""
    storage, _ = fleet
    pages = fetch(storage, "", "/", "/static/view.js", "/static/view.css", "/run?host=h&run=x")
    for page in pages:
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert pages[1].status == 200 and "javascript" in pages[1].headers["Content-Type"]
    assert pages[3].status == 404
    assert "<script>" not in pages[0].text.replace(
        '<script src="/static/view.js" defer></script>', ""
    )


def test_foreign_host_or_origin_is_refused(fleet: tuple[LocalStorage, dict[str, str]]) -> None:
    """DNS rebinding: a Host or Origin that is not this server gets 403; localhost is served."""
    storage, _ = fleet

    async def scenario(get: Get) -> list[int]:
        assert (await get("/")).status == 200
        statuses = []
        for headers in (
            {"Host": "evil.example:80"},
            {"Host": "evil.example"},
            {"Host": "127.0.0.1:1"},
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
        ):
            statuses.append((await get("/?format=json", headers=headers)).status)
        return statuses

    assert with_view(storage, "", scenario) == [403] * 5


def test_localhost_names_and_own_origin_are_served(
    fleet: tuple[LocalStorage, dict[str, str]],
) -> None:
    """``localhost:PORT`` and the server's own Origin are accepted."""
    storage, _ = fleet
    with view_server(storage) as base:
        port = base.rstrip("/").rsplit(":", 1)[1]
        for headers in (
            {"Host": f"localhost:{port}"},
            {"Origin": base.rstrip("/")},
            {"Host": f"LOCALHOST:{port}", "Origin": f"http://localhost:{port}"},
        ):
            req = urllib.request.Request(base + "?format=json", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
        req = urllib.request.Request(base, headers={"Host": f"rebound.example:{port}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 403
        refused.value.close()


def test_hostile_names_are_escaped_everywhere(tmp_path: Path) -> None:
    """Model, checkpoint, run id, host and benchmark names holding HTML are shown as text."""
    root = tmp_path / "fleet"
    host = '"><img src=x onerror=alert(2)>'
    store = EvalStore(root / host)
    bench = 'b"><svg onload=alert(3)>'  # names may not hold "/"
    run_id = write_run(store, HOSTILE, "javascript:alert(4)", benchmark=bench)
    # a run id that needs quoting in URLs, written as a directory by hand
    odd = "r&x=1#frag ?<b>"
    odd_dir = root / host / "runs" / odd
    shutil.copytree(root / host / "runs" / run_id, odd_dir)
    meta = (odd_dir / "metadata.json").read_text().replace(run_id, odd)
    (odd_dir / "metadata.json").write_text(meta)
    storage = LocalStorage(root, mkdir=False)
    from urllib.parse import quote

    pages = fetch(
        storage,
        "",
        "/",
        "/checkpoints",
        f"/run?host={quote(host)}&run={quote(run_id)}",
        f"/run?host={quote(host)}&run={quote(odd)}",
        f"/run?host={quote(host)}&run={quote(odd)}&format=json",
    )
    for page in pages[:4]:
        assert page.status == 200, page.text
        text = page.text
        for raw in (HOSTILE, "<img src=x", "<svg onload", "<b>"):
            assert raw not in text
        assert 'href="javascript:' not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text or page is pages[1]
    assert "run=r%26x%3D1%23frag+%3F%3Cb%3E" in pages[0].text
    assert pages[4].json()["run"]["run_id"] == odd


def test_a_failing_host_is_reported_and_the_others_listed(tmp_path: Path) -> None:
    """A host whose runs cannot be listed is named in the page; the other hosts' runs show."""
    root = tmp_path / "fleet"
    good = write_run(EvalStore(root / "good"), "m", "s1")
    (root / "broken").mkdir()
    (root / "broken" / "runs").write_text("not a directory")
    storage = LocalStorage(root, mkdir=False)
    html, js = fetch(storage, "", "/", "/?format=json")
    assert html.status == 200 and f'data-run-id="{good}"' in html.text
    assert 'id="host-problems"' in html.text and "broken" in html.text
    assert any("broken" in p for p in js.json()["problems"])


class _SlowHost(LocalStorage):
    """A local fleet whose listing of one host's ``runs/`` waits until released."""

    def __init__(self, root: Path, slow: str) -> None:
        super().__init__(root, mkdir=False)
        self.slow = slow
        self.release = threading.Event()
        self.listed: list[str] = []

    async def alist_dir(self, prefix: str) -> list[str]:
        self.listed.append(prefix)
        if prefix.startswith(self.slow):
            await asyncio.to_thread(self.release.wait, 30)
        return await super().alist_dir(prefix)


def test_first_screen_shows_the_first_hosts_while_a_slow_host_is_listed(tmp_path: Path) -> None:
    """A fresh view of a fleet whose last host is slow to list answers the runs page with
    the hosts listed so far, marked partial (the script polls again at once); the live
    fragment and the JSON twin wait for the whole listing, which is read once."""
    root = tmp_path / "fleet"
    fast = [write_run(EvalStore(root / "host-a"), "m1", f"s{i}") for i in range(3)]
    slow = write_run(EvalStore(root / "host-b"), "m2", "s9")
    storage = _SlowHost(root, "host-b")

    async def scenario(get: Get) -> list[Page]:
        first = await get("/")
        storage.release.set()
        return [first, await get("/?fragment=1"), await get("/?format=json")]

    first, fragment, js = with_view(storage, "", scenario, refresh_s=30)
    assert first.status == 200
    assert all(f'data-run-id="{r}"' in first.text for r in fast) and slow not in first.text
    assert re.search(r'data-partial="1" data-poll-ms="\d+"', first.text)
    assert 'data-hosts-listed="1"' in first.text and 'data-hosts="2"' in first.text
    assert f'data-run-id="{slow}"' in fragment.text and "data-partial" not in fragment.text
    assert 'data-total="4"' in fragment.text
    data = js.json()
    assert data["complete"] and data["total"] == 4 and data["hosts_listed"] == 2
    assert storage.listed.count("host-b/runs") == 1  # one listing, shared


def test_a_slow_listing_is_repeated_at_most_once_per_its_duration(
    fleet: tuple[LocalStorage, dict[str, str]],
) -> None:
    """Open pages re-list every ``refresh_s``, but a listing that took longer is reused
    for as long as it took (the server never lists more than half the time)."""
    storage, runs = fleet

    async def scenario() -> tuple[int, int, int]:
        source = ViewSource(storage, "", refresh_s=0.5)
        try:
            first = await source.runs()
            assert len(first.runs) == len(runs) and first.complete
            # as if it had taken 60 s, 2 s ago: older than refresh_s, younger than took_s
            source._snapshot = dataclasses.replace(first, took_s=60.0, read_at=time.time() - 2)
            await source.runs()
            kept = source.listings
            await source.runs(max_age_s=1.0)  # an explicit age is used as given
            return first.hosts_listed or 0, kept, source.listings
        finally:
            await source.aclose()

    hosts, kept, after = asyncio.run(scenario())
    assert (hosts, kept, after) == (2, 1, 2)


def test_missing_run_and_run_deleted_after_listing_are_messages_and_serving_goes_on(
    fleet: tuple[LocalStorage, dict[str, str]],
) -> None:
    """A missing run, a bad parameter, a run gone between listing and reading: messages; then 200s."""
    storage, runs = fleet

    async def scenario(get: Get) -> list[Page]:
        listed = await get("/")
        assert runs["b5"] in listed.text
        shutil.rmtree(storage.root / "host-b" / "runs" / runs["b5"])
        return [
            await get(f"/run?host=host-b&run={runs['b5']}"),
            await get("/run?host=host-a&run=..%2Fx"),
            await get("/run?host=host-a"),
            await get("/run?host=..&run=x&format=json"),
            await get("/?page=0"),
            await get("/"),
        ]

    gone, bad_id, no_id, bad_host, bad_page, after = with_view(storage, "", scenario)
    assert gone.status == 404 and 'id="error"' in gone.text and runs["b5"] in gone.text
    assert bad_id.status == 400 and "invalid" in bad_id.text
    assert no_id.status == 400 and "missing parameter" in no_id.text
    assert bad_host.status == 400 and "invalid host" in bad_host.json()["error"]
    assert bad_page.status == 400
    assert after.status == 200


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_fleet_on_a_bucket(backend: str, request: pytest.FixtureRequest) -> None:
    """A fleet prefix on S3 / GCS: every host's runs, a run page, the checkpoint plot."""
    storage = request.getfixturevalue(f"{backend}_storage")
    a = EvalStore(storage.child("host-a"))
    b = EvalStore(storage.child("host-b"))
    ra = write_run(a, "m1", "step10", rewards=[1, 0])
    rb = write_run(b, "m1", "step2", rewards=[0, 0])
    runs, run, plots = fetch(
        storage, "", "/?format=json", f"/run?host=host-b&run={rb}", "/checkpoints?format=json"
    )
    assert {r["run_id"] for r in runs.json()["runs"]} == {ra, rb}
    assert run.status == 200 and "m1" in run.text
    points = plots.json()["benchmarks"]["gsm8k"]["m1"]
    assert [p["checkpoint"] for p in points] == ["step2", "step10"]


def test_static_files_are_package_data() -> None:
    """The templates and static files ship in the wheel: pyproject's package-data covers them."""
    data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["evalsyncd.view"]
    base = resources.files("evalsyncd.view")
    shipped = [
        f"{d}/{f.name}"
        for d in ("templates", "static")
        for f in (base / d).iterdir()
        if f.is_file()
    ]
    assert "static/view.js" in shipped and "templates/base.html" in shipped
    from fnmatch import fnmatch

    for name in shipped:
        assert any(fnmatch(name, p) for p in patterns), name


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_prints_its_address_serves_and_stops_cleanly(
    fleet: tuple[LocalStorage, dict[str, str]], sig: signal.Signals
) -> None:
    """``evalsyncd view DIR --port 0`` prints its URL, answers, and exits 0 on SIGINT/SIGTERM."""
    storage, runs = fleet
    proc = subprocess.Popen(
        [sys.executable, "-m", "evalsyncd", "view", str(storage.root), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, line
        with urllib.request.urlopen(match.group(0) + "?format=json", timeout=10) as r:
            assert len(json.loads(r.read())["runs"]) == len(runs)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_cli_refuses_a_missing_directory(tmp_path: Path) -> None:
    """A URI that does not exist: exit 1 with a message naming it, no server."""
    proc = subprocess.run(
        [sys.executable, "-m", "evalsyncd", "view", str(tmp_path / "nope"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "nope" in proc.stderr
