"""Measurement 8: CPU per PutObject by S3 client and settings (which SDK ``S3Storage`` uses).

Each variant makes 2,000 ``PutObject`` calls of 900 bytes, 8 in flight, on
one client, to the bench's SeaweedFS server (which checks SigV4 and
``x-amz-checksum-*``). Each run is a fresh process (``bench/sdkcpu_worker.py``)
so imports and warm-up never mix: it opens the client, makes 100 unmeasured
calls, then measures the process's CPU time (user + system,
``time.process_time``; ``getrusage`` for the split) and wall time over the
2,000 calls. Full mode runs 7 rounds, quick mode 1; the variants are
interleaved within a round and the table shows the median over rounds (and
the range). CPU time on a shared 2-core machine drifts by tens of percent from
round to round, so comparisons are paired: "vs a" and "vs b" are medians over
rounds of the ratio to that variant's figure in the same round. Variants:

Each worker runs in a venv created once under ``$EVALSYNCD_BENCH_CACHE``
(default ``~/.cache/evalsyncd-bench``) with ``python -m venv`` + ``pip install``:
``sdkcpu-aioboto3/`` (``aioboto3==15.5.0``, the client evalsyncd used before,
which pins aiobotocore 2.25.1 / botocore 1.40) and ``sdkcpu-aiobotocore3/``
(``aiobotocore>=3,<4``, what evalsyncd uses now); both with ``botocore[crt]`` and
``crc32c``. Delete a directory to pick up a newer release; a venv that cannot be
created makes its variants "not run", with the reason.

- ``a``: aioboto3, default client config: botocore computes its default
  request checksum (CRC32) on every upload.
- ``a2``: as ``a`` with ``ChecksumAlgorithm="CRC32C"`` on every call: what
  ``S3Storage`` does today (botocore computes CRC32C through awscrt).
- ``b``: aioboto3 with ``AioConfig(parameter_validation=False,
  request_checksum_calculation="when_required",
  response_checksum_validation="when_required")``, and ``ChecksumCRC32C``
  (base64 of the big-endian CRC32C from the ``crc32c`` package) passed on every
  call by us, so every upload is still checked by the server.
- ``b-direct``: as ``b`` through ``aiobotocore`` directly, same venv (same
  botocore): separates "without aioboto3" from "newer botocore".
- ``c``: as ``b`` with the newest aiobotocore 3.x used directly.
- ``c-nocrt``: as ``c`` with ``BOTO_DISABLE_CRT=true``: aiobotocore 3.x as a venv
  of only ``aiobotocore`` and ``crc32c`` would run it.
- ``c-default``: aiobotocore 3.x, default config (SDK CRC32): how much of
  ``c``'s gain is the newer botocore alone.
- ``e``: aiobotocore 3.x, default config (parameter validation on, checksum
  settings ``when_supported``) and our own ``ChecksumCRC32C``: the SDK computes no
  checksum of its own when the request already carries one, so this isolates
  the three settings.
- ``d``: as ``b`` with ``BOTO_DISABLE_CRT=true`` (botocore's switch that turns off
  its awscrt code paths: the SigV4 signer becomes the pure-Python one). Found by
  profiling ``b`` (pyinstrument / cProfile): per call, endpoint rule evaluation
  (~28% of the SDK's CPU; its cache never hits because ``Key`` is an endpoint
  parameter of PutObject, with no setting to change that), signing through
  awscrt (~14%) and rebuilding the User-Agent header (~10%) dominate; only the
  signer has a supported switch.

Before ``b``, ``c`` and ``e`` measure, the worker sends a PutObject with a wrong
``ChecksumCRC32C`` (it must be rejected and leave no object) and one with the
right value (it must be stored with that checksum): the "checksum check" line.
Every run also counts botocore retries (``RetryAttempts``) and lists the objects
it wrote, so each figure is exactly one request per PutObject.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BUCKET, CACHE_DIR, Bench
from evalsyncd.testing.servers import S3_ACCESS_KEY, S3_SECRET_KEY

__all__ = ["TUNED_CONFIG", "run"]

PUTS = 2000
INFLIGHT = 8
SIZE = 900
WARMUP = 100
WORKER = Path(__file__).with_name("sdkcpu_worker.py")
VENVS: dict[str, tuple[Path, tuple[str, ...]]] = {
    # aioboto3's newest release pins aiobotocore 2 (botocore 1.40): the client evalsyncd
    # used before; the project's venv no longer has it
    "aioboto3": (CACHE_DIR / "sdkcpu-aioboto3", ("aioboto3==15.5.0", "botocore[crt]", "crc32c")),
    "aiobotocore3": (
        CACHE_DIR / "sdkcpu-aiobotocore3",
        ("aiobotocore>=3,<4", "botocore[crt]", "crc32c"),
    ),
}

TUNED_CONFIG: dict[str, Any] = {
    "parameter_validation": False,
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
}
"""The ``AioConfig`` settings of variants b, c and d (on top of region, path style, retries)."""


@dataclass(frozen=True)
class Variant:
    """One client configuration; see the module docstring."""

    key: str
    label: str
    lib: str
    checksum: str
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    venv: str = "aioboto3"
    """Key of :data:`VENVS`: the cached venv the worker runs in."""
    verify: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("a", "aioboto3, default config (SDK CRC32)", "aioboto3", "sdk"),
    Variant("a2", "aioboto3, default config, ChecksumAlgorithm=CRC32C", "aioboto3", "sdk-crc32c"),
    Variant(
        "b",
        "aioboto3, tuned, own ChecksumCRC32C",
        "aioboto3",
        "own-crc32c",
        TUNED_CONFIG,
        verify=True,
    ),
    Variant(
        "b-direct", "aiobotocore (same botocore), as b", "aiobotocore", "own-crc32c", TUNED_CONFIG
    ),
    Variant(
        "c",
        "aiobotocore 3.x direct, as b",
        "aiobotocore",
        "own-crc32c",
        TUNED_CONFIG,
        venv="aiobotocore3",
        verify=True,
    ),
    Variant(
        "c-nocrt",
        "as c + BOTO_DISABLE_CRT=true",
        "aiobotocore",
        "own-crc32c",
        TUNED_CONFIG,
        env={"BOTO_DISABLE_CRT": "true"},
        venv="aiobotocore3",
    ),
    Variant(
        "c-default",
        "aiobotocore 3.x direct, default config (SDK CRC32)",
        "aiobotocore",
        "sdk",
        venv="aiobotocore3",
    ),
    Variant(
        "e",
        "aiobotocore 3.x direct, default config, own ChecksumCRC32C",
        "aiobotocore",
        "own-crc32c",
        venv="aiobotocore3",
        verify=True,
    ),
    Variant(
        "d",
        "as b + BOTO_DISABLE_CRT=true",
        "aioboto3",
        "own-crc32c",
        TUNED_CONFIG,
        env={"BOTO_DISABLE_CRT": "true"},
    ),
)


def venv_python(name: str) -> tuple[Path | None, str | None]:
    """The interpreter of the cached venv ``name``, created once; ``(None, reason)`` on failure."""
    where, requirements = VENVS[name]
    python = where / "bin" / "python"
    ready = where / ".evalsyncd-ready"
    if ready.exists() and python.exists() and ready.read_text().split() == [*requirements]:
        return python, None
    shutil.rmtree(where, ignore_errors=True)
    where.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(where)],
        [str(python), "-m", "pip", "install", "--quiet", *requirements],
    ]
    for argv in steps:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(where, ignore_errors=True)
            return None, f"{' '.join(argv[:4])}: {type(exc).__name__}: {exc}"
        if proc.returncode != 0:
            shutil.rmtree(where, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return None, f"{' '.join(argv[:4])} exited {proc.returncode}: {' / '.join(tail)}"
    ready.write_text(" ".join(requirements) + "\n")
    return python, None


def _worker(
    python: Path, variant: Variant, endpoint: str, prefix: str, verify: bool
) -> dict[str, Any]:
    spec = {
        "lib": variant.lib,
        "config": variant.config,
        "checksum": variant.checksum,
        "endpoint": endpoint,
        "bucket": BUCKET,
        "prefix": prefix,
        "n": PUTS,
        "inflight": INFLIGHT,
        "size": SIZE,
        "warmup": WARMUP,
        "verify": verify,
    }
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONDONTWRITEBYTECODE": "1",
        **variant.env,
    }
    if "BOTO_DISABLE_CRT" not in variant.env:  # the caller's own setting must not leak in
        env.pop("BOTO_DISABLE_CRT", None)
    proc = subprocess.run(
        [str(python), str(WORKER), json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"worker for {variant.key} exited {proc.returncode}: {tail[0]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 8."""
    rounds = 1 if bench.quick else 7
    pythons = {name: venv_python(name) for name in VENVS}
    runs: dict[str, list[dict[str, Any]]] = {v.key: [] for v in VARIANTS}
    errors: dict[str, str] = {}
    for v in VARIANTS:
        python, why = pythons[v.venv]
        if python is None:
            errors[v.key] = f"not run: no {v.venv} venv ({why})"
    for r in range(rounds):
        for v in VARIANTS:
            if v.key in errors:
                continue
            python = pythons[v.venv][0]
            assert python is not None
            try:
                runs[v.key].append(
                    _worker(
                        python, v, bench.s3.endpoint_url, f"sdkcpu/{v.key}/{r}", v.verify and r == 0
                    )
                )
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                errors[v.key] = f"{type(exc).__name__}: {exc}"
    variants: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        row: dict[str, Any] = {"label": v.label, "config": v.config, "env": v.env}
        if v.key in errors:
            row["error"] = errors[v.key]
        else:
            cpu = [x["cpu_ms_per_put"] for x in runs[v.key]]
            wall = [x["wall_ms_per_put"] for x in runs[v.key]]
            first = runs[v.key][0]
            row.update(
                cpu_ms_per_put=statistics.median(cpu),
                cpu_ms_min=min(cpu),
                cpu_ms_max=max(cpu),
                wall_ms_per_put=statistics.median(wall),
                user_ms_per_put=statistics.median(x["user_s"] * 1000 / PUTS for x in runs[v.key]),
                sys_ms_per_put=statistics.median(x["sys_s"] * 1000 / PUTS for x in runs[v.key]),
                retries=sum(x["retries"] for x in runs[v.key]),
                objects_per_run=sorted({x["objects_stored"] for x in runs[v.key]}),
                versions=first["versions"],
                verify=first["verify"],
                runs=[{"cpu_ms": c, "wall_ms": w} for c, w in zip(cpu, wall, strict=True)],
            )
            for ref in ("a", "b"):
                if ref not in errors and runs[ref]:
                    pairs = zip(runs[v.key], runs[ref], strict=False)
                    row[f"vs_{ref}"] = statistics.median(x["cpu_s"] / y["cpu_s"] for x, y in pairs)
        variants[v.key] = row
    return {
        "puts": PUTS,
        "inflight": INFLIGHT,
        "size": SIZE,
        "warmup": WARMUP,
        "rounds": rounds,
        "variants": variants,
    }
