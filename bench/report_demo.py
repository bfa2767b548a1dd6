"""A demo eval sweep as a local fleet, its ``evalsyncd runs report`` and a Chromium screenshot.

    python -m bench.report_demo [--out docs] [--keep DIR]

Writes a fleet of 3 hosts (2 models, checkpoints ``step0`` .. ``step1000``,
3 benchmarks, deterministic scores that rise with training) into a temporary
directory, runs ``evalsyncd runs report`` on it, and saves
``{out}/fleet-report.png`` (headless ``/usr/bin/chromium``) and
``{out}/fleet-report.html``. The tests build the same fleet with
:func:`make_demo_fleet`.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from evalsyncd.report import PALETTE
from evalsyncd.store import BenchmarkResult, EvalStore

__all__ = ["CHROMIUM", "PALETTE_CHECK", "chromium", "make_demo_fleet"]

CHROMIUM = Path("/usr/bin/chromium")

MODELS = {"Qwen/Qwen3-8B": ("host-a", "host-b"), "meta-llama/Llama-3.1-8B": ("host-c",)}
BENCHMARKS = {"gsm8k": (0.35, 0.45), "math": (0.15, 0.35), "mmlu": (0.55, 0.15)}
STEPS = (0, 200, 400, 600, 800, 1000)
PALETTE_CHECK = PALETTE[: len(MODELS)]
"""The line colours the demo's plots use (one per model)."""


def _score(model: str, bench: str, step: int) -> float:
    start, gain = BENCHMARKS[bench]
    if "llama" in model.lower():
        start, gain = start - 0.08, gain * 0.8
    wobble = 0.015 * math.sin(step / 137 + len(bench) + len(model))
    return round(start + gain * (1 - math.exp(-step / 400)) + wobble, 4)


def make_demo_fleet(fleet: Path) -> dict[tuple[str, str], dict[str, float]]:
    """Write the demo sweep under ``fleet/{host}``; returns ``(host, run_id) -> scores``."""
    expected: dict[tuple[str, str], dict[str, float]] = {}
    for model, hosts in MODELS.items():
        for k, step in enumerate(STEPS):
            host = hosts[k % len(hosts)]
            store = EvalStore(fleet / host)
            short = model.split("/")[-1].lower().replace(".", "")
            run_id = store.create_run(
                model,
                list(BENCHMARKS),
                checkpoint_path=f"tinker://demo/{short}/step{step}",
                checkpoint_name=f"step{step}",
                run_id=f"{short}-step{step}",
            )
            for bench in BENCHMARKS:
                score = _score(model, bench, step)
                n = 500
                store.write_result(
                    run_id,
                    BenchmarkResult(
                        name=bench, score=score, num_examples=n, num_correct=round(score * n)
                    ),
                )
            expected[(host, run_id)] = store.finalize_run(run_id).scores
    return expected


def chromium(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium (no sandbox: CI runs as root) with ``args``; output captured."""
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--proxy-server=127.0.0.1:9",  # any network fetch would fail: the page needs none
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--keep", type=Path, help="build the fleet in DIR and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="evalsyncd-report-demo-") as tmp:
        fleet = args.keep or Path(tmp) / "fleet"
        make_demo_fleet(fleet)
        args.out.mkdir(parents=True, exist_ok=True)
        html = args.out / "fleet-report.html"
        subprocess.run(
            [sys.executable, "-m", "evalsyncd", "runs", "report", str(fleet), "-o", str(html)],
            check=True,
        )
        text = html.read_text().replace(str(fleet), "s3://evals-bucket/evals")
        html.write_text(text)
        png = args.out / "fleet-report.png"
        out = chromium(
            f"--screenshot={png.absolute()}", "--window-size=1460,960", html.absolute().as_uri()
        )
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        print(f"wrote {html} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
