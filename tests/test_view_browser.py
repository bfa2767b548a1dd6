"""``evalsyncd view`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Clicks through as a person would: the runs list, a run, its samples with a filter and
a search, one sample, a comparison and one pair; reads the numbers back from the page.
Hostile names and contents must never run as script (an ``alert`` would open a dialog).

``EVALSYNCD_VIEW_SCREENSHOTS=DIR`` also saves the screenshots used in ``docs/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evalsyncd.storage import LocalStorage
from evalsyncd.store import BenchmarkResult, EvalStore
from tests.viewhelpers import HOSTILE, view_server, write_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="no Chromium at /usr/bin/chromium (CI installs Debian's chromium in .ci/run)",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium page (never a downloaded browser: the system's)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1280, "height": 860})
            page = context.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.dialogs = dialogs  # type: ignore[attr-defined]
            yield page
            assert dialogs == [], f"a script from the data ran: {dialogs}"
            context.close()
        finally:
            chromium.close()


def _shot(page: Any, name: str) -> None:
    out = os.environ.get("EVALSYNCD_VIEW_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / name), full_page=False)


def _fleet(storage: Any) -> dict[str, str]:
    a, b = EvalStore(storage.child("host-a")), EvalStore(storage.child("host-b"))
    base = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    cand = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    runs = {
        "a": write_run(
            a,
            "llama-8b",
            "step100",
            rewards=base,
            answers={1: "42\nbecause six times seven", 3: "javascript:alert(5)"},
        ),
        "b": write_run(
            a,
            "llama-8b",
            "step200",
            rewards=cand,
            errors={5: "timeout after 60 s </textarea><script>alert(6)</script>"},
            answers={1: "41\nbecause six times seven", 2: "<script>alert(7)</script>"},
        ),
        "c": write_run(b, HOSTILE, "step20", rewards=[0.0, 1.0, 0.0, 0.0]),
    }
    return runs


@pytest.fixture
def s3_fleet(s3_storage: Any) -> dict[str, str]:
    """The fleet on the S3 server, written before the browser starts (Playwright's sync API
    runs an event loop in this thread, where the storage's sync methods refuse to run)."""
    return _fleet(s3_storage)


def test_click_through_runs_samples_sample_and_compare(
    s3_fleet: dict[str, str], s3_storage: Any, browser: Any
) -> None:
    """Runs -> run -> samples (filter, search) -> sample; run -> compare -> pair; numbers read back.

    The fleet is on the S3 server (SeaweedFS), read as ``evalsyncd view s3://...`` reads it.
    """
    runs = s3_fleet
    page = browser
    with view_server(s3_storage) as base:
        page.goto(base)
        rows = page.locator("#runs tbody tr.run")
        assert rows.count() == 3
        assert page.locator("#summary").get_attribute("data-total") == "3"
        hostile_row = page.locator(f'tr[data-run-id="{runs["c"]}"] td').nth(1)
        assert hostile_row.inner_text() == HOSTILE  # shown as text, not run
        score = page.locator(f'tr[data-run-id="{runs["b"]}"] td[data-benchmark="gsm8k"]')
        assert score.inner_text() == "0.625"
        _shot(page, "view-runs.png")

        # filter by model and sort by score
        page.select_option("select[name=model]", "llama-8b")
        page.click("#runs-filter button[type=submit]")
        page.wait_for_url("**model=llama-8b**")
        assert page.locator("#runs tbody tr.run").count() == 2

        page.click(f'tr[data-run-id="{runs["a"]}"] a.run-link')
        page.wait_for_selector("#run-title")
        assert page.locator("#run-title").get_attribute("data-run-id") == runs["a"]
        assert (
            page.locator('#benchmarks tr[data-benchmark="gsm8k"] td').nth(1).inner_text() == "0.625"
        )

        # samples, a filter, a search
        page.click("a.samples-link")
        page.wait_for_selector("#samples")
        assert page.locator("#samples tbody tr.sample").count() == 8
        assert (
            page.locator('#filters a[data-filter="incorrect"]').get_attribute("data-count") == "3"
        )
        page.click('#filters a[data-filter="incorrect"]')
        page.wait_for_url("**filter=incorrect**")
        lines = page.locator("#samples tbody tr.sample").evaluate_all(
            "rows => rows.map(r => r.dataset.idx)"
        )
        assert lines == ["2", "3", "5"]
        page.fill("#samples-search input[name=q]", "because six")
        page.click("#samples-search button[type=submit]")
        page.wait_for_url("**q=because**")
        assert page.locator("#samples tbody tr.sample").count() == 0  # idx 1 is correct in A
        page.goto(page.url.replace("filter=incorrect&", ""))
        page.wait_for_selector("#samples")
        assert page.locator("#samples tbody tr.sample").evaluate_all(
            "rows => rows.map(r => r.dataset.idx)"
        ) == ["1"]
        _shot(page, "view-samples.png")

        # one sample
        page.click("#samples a.sample-link")
        page.wait_for_selector("#sample-title")
        assert page.locator(".sample-meta td.reward").inner_text() == "1.000"
        assert "42" in page.locator(".turn.assistant pre").inner_text()

        # compare A (step100) with B (step200)
        page.goto(f"{base}run?host=host-a&run={runs['a']}")
        page.select_option("select[name=b]", f"host-a/{runs['b']}")
        page.click(".compare-form button[type=submit]")
        page.wait_for_selector("#counts")
        counts = dict(
            page.locator("#counts tbody tr").evaluate_all(
                "rows => rows.map(r => [r.dataset.category, Number(r.dataset.count)])"
            )
        )
        assert counts["regression"] == 2  # idx 1 and 7: correct in A, not in B
        assert counts["improvement"] == 2  # idx 2 and 3
        assert counts["new_error"] == 1  # idx 5: B errored
        p = float(page.locator("#mcnemar-p").get_attribute("data-value"))
        assert 0.0 < p <= 1.0
        _shot(page, "view-compare.png")
        page.click("#counts a.cat.regression")
        page.wait_for_url("**category=regression**")
        page.click("#pairs a.pair-link >> nth=0")
        page.wait_for_selector("#diff")
        diff = page.locator("#diff").inner_text()
        assert "-42" in diff and "+41" in diff
        assert page.locator("#side-a .reward").inner_text() == "1.000"
        assert page.locator("#side-b .reward").inner_text() == "0.000"


def test_hostile_contents_never_run_and_long_turns_load_more(tmp_path: Path, browser: Any) -> None:
    """Turns holding script, a 1 MB answer: shown as text, cut, the rest loaded on demand."""
    root = tmp_path / "fleet"
    store = EvalStore(root / "h")
    long_answer = "A" * 1_000_000 + "THE-END"
    run_id = write_run(
        store,
        "m",
        "s1",
        rewards=[0.0, 1.0],
        answers={
            0: "</pre></textarea><script>alert(8)</script><a href='javascript:alert(9)'>x</a>",
            1: long_answer,
        },
    )
    page = browser
    with view_server(LocalStorage(root, mkdir=False)) as base:
        page.goto(f"{base}sample?host=h&run={run_id}&benchmark=gsm8k&line=0")
        text = page.locator(".turn.assistant pre").inner_text()
        assert "<script>alert(8)</script>" in text
        assert page.locator(".turn.assistant a").count() == 0
        page.goto(f"{base}sample?host=h&run={run_id}&benchmark=gsm8k&line=1")
        pre = page.locator(".turn.assistant pre")
        assert len(pre.inner_text()) == 20_000
        for _ in range(10):
            button = page.locator(".turn.assistant button.more")
            if button.count() == 0:
                break
            before = len(pre.inner_text())
            button.click()
            page.wait_for_function(
                "([sel, n]) => document.querySelector(sel).textContent.length > n",
                arg=[".turn.assistant pre", before],
            )
        assert pre.inner_text().endswith("THE-END")
        assert len(pre.inner_text()) == len(long_answer)


def test_runs_page_updates_live(tmp_path: Path, browser: Any) -> None:
    """A run created on a host while the page is open appears without a reload."""
    root = tmp_path / "fleet"
    store = EvalStore(root / "h")
    write_run(store, "m", "s1")
    page = browser
    with view_server(LocalStorage(root, mkdir=False), refresh_s=0.3) as base:
        page.goto(base)
        assert page.locator("#runs tbody tr.run").count() == 1
        new = write_run(store, "m", "s2", finalize=False)
        page.wait_for_selector(f'tr[data-run-id="{new}"][data-status="running"]', timeout=15_000)
        page.evaluate("window.__marker = 1")  # survives only if the page was not reloaded
        result = BenchmarkResult(name="gsm8k", score=0.5, num_examples=4, num_correct=2)
        store.write_result(new, result)
        store.finalize_run(new)
        page.wait_for_selector(f'tr[data-run-id="{new}"][data-status="finalized"]', timeout=15_000)
        assert page.evaluate("window.__marker") == 1
