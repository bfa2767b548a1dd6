"""aiohttp's default TLS contexts, without CA certificates loaded before they are needed.

aiohttp (the HTTP client of aiobotocore and of gcloud-aio) builds two TLS contexts when
``aiohttp.connector`` is imported: a verifying one (``ssl.create_default_context()``)
and a non-verifying one, and each loads the system's CA certificates
(``SSLContext.set_default_verify_paths``). With OpenSSL 3 that costs about 20 ms of CPU
each (python/cpython#95031): some 40 ms of every ``evalsyncd`` process that talks to a
bucket, about a twentieth of a daemon's start.

Neither is needed by most processes:

- the non-verifying context verifies nothing, so its certificates are never read;
- the verifying one serves only requests that bring no TLS context of their own.
  Every S3 request brings one (aiobotocore's, built from the client's ``verify`` and CA
  bundle; :class:`~._s3put.LeanPut`'s, :func:`~._s3put.tls_context`). The GCS client
  (gcloud-aio, and its token requests) brings none: :class:`~.gcs.GCSStorage` calls
  :func:`load_default_cas` before it opens an HTTP session.

:func:`defer_default_cas` makes the import of ``aiohttp.connector`` skip those loads;
:func:`load_default_cas` loads them into the verifying context, once. Only the command
line's entry point calls the first, for its own process: never the library, nor
:func:`evalsyncd.cli.main` called from another program, whose own aiohttp requests rely
on these contexts. A request through the verifying context before the load fails its
certificate check (``CERTIFICATE_VERIFY_FAILED``): it never goes out unverified.
"""

from __future__ import annotations

import importlib.machinery
import ssl
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["defer_default_cas", "load_default_cas"]

_MODULE = "aiohttp.connector"
"""The module whose import builds the contexts."""

_deferred: list[ssl.SSLContext] = []
"""Verifying contexts built by that import, their CA certificates not loaded yet."""

_lock = threading.Lock()


def defer_default_cas() -> None:
    """Make the coming import of ``aiohttp.connector`` build its TLS contexts without
    loading CA certificates (see the module docstring). No effect once it is imported.
    For the ``evalsyncd`` process only (its console script): call
    :func:`load_default_cas` before any request that may use aiohttp's default verifying
    context. The finder stays in ``sys.meta_path`` (it answers only that module, once)."""
    if _MODULE in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def load_default_cas() -> None:
    """Load the system's CA certificates into aiohttp's default verifying context if
    :func:`defer_default_cas` deferred them; otherwise nothing. Blocks for the load
    (about 20 ms with OpenSSL 3), once per process."""
    with _lock:
        while _deferred:
            _deferred.pop().set_default_verify_paths()


class _Finder:
    """A meta path finder (PEP 451; no ``importlib.abc`` base, whose import costs 4 ms):
    finds ``aiohttp.connector`` as the path finder does, with a loader that defers."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MODULE or _MODULE in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader)  # type: ignore[assignment]  # a loader by protocol
        return spec


class _Loader:
    """Runs the module's code with ``set_default_verify_paths`` recording, in this
    thread only, the contexts it was called on instead of loading certificates."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.inner.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.inner  # the module as a plain import leaves it
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        own = "set_default_verify_paths" in vars(ssl.SSLContext)
        real = ssl.SSLContext.set_default_verify_paths
        importing = threading.get_ident()
        built: list[ssl.SSLContext] = []

        def deferred(ctx: ssl.SSLContext) -> None:
            if threading.get_ident() != importing:
                real(ctx)  # another thread's context: as always
            else:
                built.append(ctx)

        ssl.SSLContext.set_default_verify_paths = deferred  # type: ignore[method-assign,assignment]
        try:
            self.inner.exec_module(module)
        finally:
            if own:
                ssl.SSLContext.set_default_verify_paths = real  # type: ignore[method-assign]
            else:  # inherited from _ssl._SSLContext: leave the class as it was
                del ssl.SSLContext.set_default_verify_paths
        with _lock:
            _deferred.extend(c for c in built if c.verify_mode != ssl.CERT_NONE)
