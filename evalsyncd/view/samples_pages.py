"""Samples, one sample and compare pages (over :mod:`evalsyncd.samples`)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["add_routes"]


def add_routes(app: web.Application) -> None:
    """Add the samples, sample and compare routes to ``app``."""
