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
command's first client. Here, while a model loads, the answer for that one name
comes from that service's own directory (botocore's ``list_api_versions``: the
same search path, the same test); every other caller gets botocore's walk.

Its files are parsed into plain dicts (:class:`JSONFileLoader`). botocore parses
them with ``object_pairs_hook=OrderedDict``, to keep the order of their keys
(botocore#51, from the days of Python 2.6); a plain dict keeps it too since
Python 3.7, and parses two to three times faster: the endpoint data, the S3 model
and its rule set are read and parsed in about 20 ms instead of 33 ms, on the first
client of every command (``docs/benchmarks.md`` section 3). botocore only reads, copies and
iterates what it loads; it never asks for an ``OrderedDict``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import IO, Any

from aiobotocore.session import AioSession
from botocore.exceptions import DataNotFoundError
from botocore.loaders import JSONFileLoader as _BotocoreJSONFileLoader
from botocore.loaders import Loader as _BotocoreLoader
from botocore.utils import get_environ_proxies

__all__ = ["JSONFileLoader", "Loader", "create_loader", "new_session", "tls_free"]


class JSONFileLoader(_BotocoreJSONFileLoader):  # type: ignore[misc]
    """botocore's loader of its JSON data files (``.json``, ``.json.gz``), which parses
    them into plain dicts instead of ``OrderedDict`` (the same keys, in the same order).

    Overrides botocore's per-file step (``_load_file``): were botocore to rename it,
    its own parsing would apply again, slower and as correct
    (``tests/test_startup.py`` notices).
    """

    def _load_file(self, full_path: str, open_method: Callable[..., IO[bytes]]) -> Any:
        if not os.path.isfile(full_path):
            return None
        with open_method(full_path, "rb") as fp:
            payload = fp.read()
        return json.loads(payload.decode("utf-8"))


class Loader(_BotocoreLoader):  # type: ignore[misc]
    """botocore's data loader, with the question ``load_service_model`` asks before it
    loads a model (whether the service exists: ``list_available_services``) answered
    from that one service's directory, through botocore's ``list_api_versions`` (the
    same search path, the same test), when the service is there. For an unknown name,
    and for every other caller, ``list_available_services`` is botocore's walk (a
    sorted list). Thread-safe as botocore's is (its caches are plain dicts; a race
    computes an answer twice). Its files are parsed by :class:`JSONFileLoader`."""

    FILE_LOADER_CLASS = JSONFileLoader

    def __init__(self, extra_search_paths: list[str] | None = None) -> None:
        super().__init__(extra_search_paths=extra_search_paths)
        self._loading = threading.local()

    def load_service_model(
        self, service_name: str, type_name: str, api_version: str | None = None
    ) -> Any:
        self._loading.name = service_name
        try:
            return super().load_service_model(service_name, type_name, api_version)
        finally:
            self._loading.name = None

    def list_available_services(self, type_name: str) -> list[str]:
        name = getattr(self._loading, "name", None)
        if isinstance(name, str) and self._has(name, type_name):
            return [name]  # the one answer the model's load needs: the name is known
        names: list[str] = super().list_available_services(type_name)
        return names

    def _has(self, name: str, type_name: str) -> bool:
        """Whether some API version of service ``name`` has ``type_name`` data."""
        if not name or os.sep in name or name in (".", ".."):
            return False
        try:
            return bool(self.list_api_versions(name, type_name))
        except DataNotFoundError:
            return False


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
