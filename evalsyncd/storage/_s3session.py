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
"""

from __future__ import annotations

import threading
from typing import Any

from aiobotocore.session import AioSession
from botocore.loaders import create_loader
from botocore.utils import get_environ_proxies

__all__ = ["new_session", "tls_free"]

_lock = threading.Lock()
_loaders: dict[Any, Any] = {}
"""``data_path`` setting -> the botocore ``Loader`` every session of this process shares."""


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
