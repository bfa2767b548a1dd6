"""Samples of a store's runs, read without the browser: pages, filters, search, compare, export.

A *sample* is one line of ``runs/{run_id}/{benchmark}/trajectories.jsonl``.
:class:`SampleReader` reads them from one host's store (a local root or a host
prefix on ``s3://`` / ``gs://``) through ranged reads, with a per-file index
cached on local disk (:mod:`evalsyncd.samples.index`); :func:`compare` (and
:func:`compare_indexes`, for two indexed files) sorts two runs' samples into
categories with a paired test; :mod:`evalsyncd.samples.export` writes a samples
table (``evalsyncd runs export``).

This package sits above :mod:`evalsyncd.store` and :mod:`evalsyncd.fleet`; the
storage, store and sync layers never import it.
"""

from __future__ import annotations

from evalsyncd.samples.compare import (
    Category,
    CompareRow,
    CompareRows,
    Comparison,
    compare,
    compare_indexes,
)
from evalsyncd.samples.index import SampleIndex, default_cache_dir
from evalsyncd.samples.lines import BadLine, SampleEntry, SampleFilter
from evalsyncd.samples.reader import RunSamples, SamplePreview, SampleReader, SearchResult

__all__ = [
    "BadLine",
    "Category",
    "CompareRow",
    "CompareRows",
    "Comparison",
    "RunSamples",
    "SampleEntry",
    "SampleFilter",
    "SampleIndex",
    "SamplePreview",
    "SampleReader",
    "SearchResult",
    "compare",
    "compare_indexes",
    "default_cache_dir",
]
