"""Helpers of the ``evalsyncd view`` tests: a fleet writer and the app under aiohttp's test client."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from evalsyncd.storage import Storage
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory, StoredTurn
from evalsyncd.view import ViewSource, create_app, serve

HOSTILE = "<script>alert(1)</script>"
"""A string that would run as script if a page did not escape it."""


@dataclass
class Page:
    """One response, read whole."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)


def write_run(
    store: EvalStore,
    model: str,
    checkpoint: str | None,
    *,
    benchmark: str = "gsm8k",
    rewards: list[float] | None = None,
    errors: dict[int, str] | None = None,
    answers: dict[int, str] | None = None,
    finalize: bool = True,
) -> str:
    """A run with one benchmark: a trajectory per reward (``ex{i}``), a result, finalized."""
    rewards = [1.0, 0.0, 1.0, 1.0] if rewards is None else rewards
    errors = errors or {}
    answers = answers or {}
    run_id = store.create_run(model, [benchmark], checkpoint_name=checkpoint)
    for i, reward in enumerate(rewards):
        store.write_trajectory(
            run_id,
            benchmark,
            StoredTrajectory(
                idx=i,
                benchmark=benchmark,
                example_id=f"ex{i}",
                turns=[
                    StoredTurn("user", f"question {i}"),
                    StoredTurn("assistant", answers.get(i, f"the answer is {i}")),
                ],
                reward=reward,
                metrics={"correct": float(reward > 0)},
                error=errors.get(i),
            ),
        )
    if finalize:
        correct = sum(1 for r in rewards if r > 0)
        store.write_result(
            run_id,
            BenchmarkResult(
                name=benchmark,
                score=correct / len(rewards) if rewards else 0.0,
                num_examples=len(rewards),
                num_correct=correct,
                num_errors=len(errors),
            ),
        )
        store.finalize_run(run_id)
    return run_id


Scenario = Callable[[Callable[..., Awaitable[Page]]], Awaitable[Any]]


def with_view(storage: Storage, prefix: str, scenario: Scenario, *, refresh_s: float = 0.2) -> Any:
    """Run ``scenario(get)`` against the app over ``storage``/``prefix``, on a fresh loop.

    ``get(path, headers=None)`` answers a :class:`Page`; requests go through a
    real socket on 127.0.0.1 (aiohttp's test server).
    """

    async def main() -> Any:
        source = ViewSource(storage, prefix, refresh_s=refresh_s, cache_dir=Path(cache))
        app = create_app(source)
        try:
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:

                async def get(path: str, headers: dict[str, str] | None = None) -> Page:
                    async with client.get(path, headers=headers, allow_redirects=False) as r:
                        return Page(r.status, dict(r.headers), await r.read())

                return await scenario(get)
        finally:
            await source.aclose()

    with tempfile.TemporaryDirectory(prefix="view-cache-") as cache:
        return asyncio.run(main())


def fetch(storage: Storage, prefix: str, *paths: str) -> list[Page]:
    """GET each path in turn; the pages."""

    async def scenario(get: Callable[..., Awaitable[Page]]) -> list[Page]:
        return [await get(p) for p in paths]

    result: list[Page] = with_view(storage, prefix, scenario)
    return result


@contextmanager
def view_server(storage: Storage, prefix: str = "", *, refresh_s: float = 0.3) -> Iterator[str]:
    """``evalsyncd view`` as the CLI runs it, on a thread; yields its base URL."""
    ready: list[str] = []
    got = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop

        def on_ready(url: str) -> None:
            ready.append(url)
            got.set()

        await serve(
            storage,
            prefix,
            port=0,
            refresh_s=refresh_s,
            cache_dir=Path(cache),
            stop=stop,
            on_ready=on_ready,
        )

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # shown by the test
            state["error"] = exc
            got.set()

    tmp = tempfile.TemporaryDirectory(prefix="view-cache-")
    cache = tmp.name
    thread = threading.Thread(target=thread_main, name="view-server", daemon=True)
    thread.start()
    if not got.wait(30):
        raise AssertionError("the view server did not start within 30 s")
    if "error" in state:
        raise AssertionError(f"the view server failed: {state['error']!r}")
    try:
        yield ready[0]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        tmp.cleanup()
