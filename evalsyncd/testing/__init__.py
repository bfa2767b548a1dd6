"""Test support that ships with the package: for evalsyncd's own tests, its benchmarks,
the demo, and anyone who writes a storage backend.

- :mod:`evalsyncd.testing.contract`: the storage contract as an importable test
  suite (``StorageContract``, in the style of fsspec's ``tests/abstract``): a
  backend's test module subclasses it and provides a ``storage`` fixture.
  Needs pytest (the ``test`` extra).
- :mod:`evalsyncd.testing.servers`: real local object-store servers (SeaweedFS
  for S3, fake-gcs-server for GCS) on loopback (the ``servers`` extra).
- :mod:`evalsyncd.testing.proxy`: loopback TCP proxies that count bytes and
  HTTP requests and add latency, between a client and such a server.
- :mod:`evalsyncd.testing.tls`: a throwaway CA and a proxy that terminates TLS
  in front of such a server (``https://127.0.0.1:{port}``).

The in-memory backend with fault injection, for fast unit tests, is
:mod:`evalsyncd.storage.memory`.

Importing this package imports none of its modules.
"""

__all__: list[str] = []  # the modules are imported by name
