"""`evalsyncd demo`, end to end, as a newcomer runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def test_demo_mirrors_to_local_s3_and_gcs_and_verifies(tmp_path: Path) -> None:
    """The demo exits 0 well under two minutes: both buckets verify identical to the local
    tree, a run is read back from each, and its working directory is removed."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST"):
        env.pop(key, None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "evalsyncd", "demo", "--seconds", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 60, f"demo took {elapsed:.0f} s"
    out = proc.stdout
    assert out.count(": identical") == 2, out
    assert out.count("3 runs listed; newest:") == 2, out
    assert "files behind" in out  # live progress lines
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"
