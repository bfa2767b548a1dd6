"""SDK sessions for ``S3Storage`` clients: one botocore data loader per process.

Each ``S3Storage`` opens its own aiobotocore session and client (one per event
loop; ``_clients.py``), and a botocore session reads its service data (the S3
service model, endpoint rule set, partitions: JSON files shipped with botocore)
through its own *data loader*, which caches what it parsed for that session
only. A process that opens storages one after another (``evalsyncd runs ls``
run in a loop, a web view, a test, a bench reader that opens a fresh storage
every 50 ms) used to parse those files again for every client: about 0.1 s of
CPU and a few hundred thousand short-lived objects per client, which also wake
the cyclic garbage collector.

:func:`new_session` gives every session the same loader (botocore's
``Loader``, whose results are cached per instance), one per ``data_path``
setting (``AWS_DATA_PATH``). The loader holds only data read from botocore's
own files, which botocore never changes after loading; credentials, profile,
region and every other setting stay per session, so a session still sees the
environment as it is when it is created. Opening a second client in a process
then costs about 10-25 ms instead of about 100-300 ms (``bench/backfill.py``'s
reader; ``docs/benchmarks.md`` section 3).

That loader is a :class:`Loader`, botocore's own with one question answered
without a scan. Before it loads any model, botocore's ``load_service_model``
asks ``list_available_services(type_name)`` whether the service exists: a walk
of every service directory botocore ships (about 430, with a ``listdir`` and
file checks in each), once per model type a process loads (the service model,
the endpoint rule set, the paginators): about 6 ms of CPU each, on every
command's first client. Here the answer is a :class:`ServiceNames` that tells
whether one name is there from that service's own directory (botocore's
``list_api_versions``: the same search path, the same test) and walks them all
only if it is listed or counted.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from aiobotocore.session import AioSession
from botocore.exceptions import DataNotFoundError
from botocore.loaders import Loader as _BotocoreLoader
from botocore.utils import get_environ_proxies

__all__ = ["Loader", "ServiceNames", "create_loader", "new_session", "tls_free"]


class ServiceNames(Sequence[str]):
    """The services that have ``type_name`` data, as botocore's
    ``Loader.list_available_services`` answers (sorted names), found lazily.

    ``name in names`` looks only in that service's directory, through the loader's
    ``list_api_versions`` (true when some API version of ``name`` has a ``type_name``
    file in the loader's search path: the test the full walk applies to each
    directory). Iterating, indexing or ``len`` walk every directory once, as
    botocore does, and keep the list.
    """

    def __init__(self, loader: Loader, type_name: str) -> None:
        self._loader = loader
        self._type_name = type_name
        self._names: list[str] | None = None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not name or os.sep in name:
            return False
        if self._names is not None:
            return name in self._names
        try:
            return bool(self._loader.list_api_versions(name, self._type_name))
        except DataNotFoundError:
            return False

    def _all(self) -> list[str]:
        if self._names is None:
            self._names = self._loader.scan_services(self._type_name)
        return self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, index: Any) -> Any:
        return self._all()[index]

    def __repr__(self) -> str:
        return f"ServiceNames({self._type_name!r})"


class Loader(_BotocoreLoader):  # type: ignore[misc]
    """botocore's data loader whose ``list_available_services`` answers with a
    :class:`ServiceNames`: the same answers, with one service's directory read for a
    membership test instead of all of them. Thread-safe as botocore's is (its caches
    are plain dicts; a race computes an answer twice)."""

    def __init__(self, extra_search_paths: list[str] | None = None) -> None:
        super().__init__(extra_search_paths=extra_search_paths)
        self._service_names: dict[str, ServiceNames] = {}

    def list_available_services(self, type_name: str) -> ServiceNames:
        names = self._service_names.get(type_name)
        if names is None:
            names = self._service_names[type_name] = ServiceNames(self, type_name)
        return names

    def scan_services(self, type_name: str) -> list[str]:
        """botocore's own walk: every service with ``type_name`` data, sorted."""
        names: list[str] = super().list_available_services(type_name)
        return names


def create_loader(data_path: str | None) -> Loader:
    """A :class:`Loader` for the ``data_path`` setting (``AWS_DATA_PATH``: directories
    separated by ``os.pathsep``), searched before botocore's own data, as botocore's
    ``create_loader`` builds it."""
    if data_path is None:
        return Loader()
    paths = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)]
    return Loader(extra_search_paths=paths)


_lock = threading.Lock()
_loaders: dict[str | None, Loader] = {}
"""``data_path`` setting -> the :class:`Loader` every session of this process shares."""


def new_session(profile: str | None = None) -> AioSession:
    """A fresh aiobotocore session for ``profile`` that shares this process's data loader.

    Args:
        profile: the AWS profile name (``None``: the default chain).

    Returns:
        A new session: settings and credentials are its own; the parsed service
        data (models, endpoints) is shared with every other session of the process
        configured with the same ``data_path``.
    """
    session = AioSession(profile=profile)
    data_path = session.get_config_variable("data_path")
    with _lock:
        loader = _loaders.get(data_path)
        if loader is None:
            loader = _loaders[data_path] = create_loader(data_path)
    session.register_component("data_loader", loader)
    return session


def tls_free(endpoint_url: str | None) -> bool:
    """Whether no request to ``endpoint_url`` can use TLS: an ``http://`` endpoint with no
    proxy for it in the environment (``HTTP_PROXY``/``NO_PROXY``, read as botocore reads
    them, :func:`botocore.utils.get_environ_proxies`).

    Such a client needs no CA bundle, whose loading (``verify``) costs about 15 ms of
    CPU per client: aiobotocore builds the TLS context of every new client's connection
    pool whether or not a request ever uses it. ``False`` for ``None`` (the AWS
    endpoint, ``https://``) and for any proxied endpoint (an ``https://`` proxy is
    verified with the client's CA bundle).
    """
    if endpoint_url is None or not endpoint_url.lower().startswith("http://"):
        return False
    return not get_environ_proxies(endpoint_url)
