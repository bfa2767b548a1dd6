"""``LocalStorage``: the storage contract on a local (or NFS-mounted) directory."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import ClassVar, Self

from evalsyncd.errors import ConflictError, InvalidKeyError, ObjectNotFoundError
from evalsyncd.storage._base import StorageStat, check_key
from evalsyncd.storage.tail import TailWriter

INTERNAL_DIR = ".evalsyncd"

__all__ = ["LocalStorage"]


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_mtime_ns}"


class LocalStorage:
    """Files under a local directory; implements ``Storage`` and ``AsyncStorage``.

    - ``write`` is atomic: the bytes go to ``.{name}.{pid}.tmp`` in the same
      directory, then ``os.replace`` moves it over the file.
    - ``append`` without ``offset`` is one ``O_APPEND`` ``write(2)``: several
      processes appending whole records to one file never interleave or tear
      them (on local filesystems; the kernel holds the inode lock for the write).
    - ``append`` with ``offset`` takes an exclusive ``flock`` on the file, checks
      its size and writes at that position (``pwrite``): the conditional append.
    - Paths that escape the root, through ``..`` or through a symlink, raise
      :class:`~evalsyncd.errors.InvalidKeyError` (a ``ValueError``).
    - Async methods run the sync ones in a worker thread (``asyncio.to_thread``).

    Instances hold only configuration and pickle.

    Args:
        root: the directory; ``~`` is expanded and the path resolved.
        mkdir: create ``root`` (and parents) if missing.
        durable: ``fsync`` files after writes and appends, and the directory after
            a rename (for mirrors whose acknowledgements must survive power loss).
    """

    append_in_place_min_bytes: ClassVar[int] = 0
    """Capability (see ``CloudStorage``): ``append`` writes at the offset, any size."""
    supports_tail: ClassVar[bool] = False
    """Capability: no tail log; appends are positional writes, one per file."""
    read_tail: bool = False
    async_native: ClassVar[bool] = False
    """Capability: the ``a*`` methods run the sync ones in a worker thread."""

    def tail_writer(self, writer: str) -> TailWriter:
        """Not supported: a local directory needs no tail log.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("LocalStorage keeps no tail log")

    def __init__(self, root: str | Path, *, mkdir: bool = True, durable: bool = False) -> None:
        self._root = Path(root).expanduser().resolve()
        self.durable = durable
        if mkdir:
            self._root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self._root)!r})"

    @property
    def root(self) -> Path:
        """The resolved root directory."""
        return self._root

    @property
    def local_root(self) -> Path:
        """Capability (see :class:`~evalsyncd.storage.Backend`): the directory, :attr:`root`."""
        return self._root

    async def achecksum(self, path: str) -> tuple[str, str] | None:
        """See :meth:`Backend.achecksum`: ``None``, a local file keeps no checksum."""
        self._resolve(path)
        return None

    def url(self, path: str = "") -> str:
        """A ``file:///`` URI; see :meth:`Storage.url`."""
        return (self._root / path if path else self._root).as_uri()

    def _resolve(self, path: str, *, allow_root: bool = False) -> Path:
        if allow_root and path.strip("/") == "":
            return self._root
        check_key(path)
        resolved = (self._root / path).resolve()
        if not resolved.is_relative_to(self._root):
            raise InvalidKeyError(f"invalid storage key {path!r}: escapes the root {self._root}")
        return resolved

    # -- sync ----------------------------------------------------------------------

    def read(self, path: str) -> bytes:
        """See :meth:`Storage.read`."""
        full = self._resolve(path)
        try:
            return full.read_bytes()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"{full}: no such file", url=self.url(path)) from exc

    def write(self, path: str, data: bytes) -> str | None:
        """See :meth:`Storage.write`."""
        full = self._resolve(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        tmp = full.with_name(f".{full.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, full)
        if self.durable:
            self._fsync_dir(full.parent)
        return _version(full.stat())

    def append(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """See :meth:`Storage.append`."""
        full = self._resolve(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        if offset is None:
            fd = os.open(full, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data)
                if self.durable:
                    os.fsync(fd)
                return _version(os.fstat(fd))
            finally:
                os.close(fd)
        fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size == offset:
                written = os.pwrite(fd, data, offset)
                if written != len(data):
                    raise OSError(f"{full}: short write ({written} of {len(data)} bytes)")
                if self.durable:
                    os.fsync(fd)
            elif not (size == offset + len(data) and os.pread(fd, len(data), offset) == data):
                raise ConflictError(
                    f"{full}: append at offset {offset} but the file holds {size} bytes",
                    url=self.url(path),
                    actual_size=size,
                )
            return _version(os.fstat(fd))
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        """See :meth:`Storage.exists`."""
        return self._resolve(path).is_file()

    def stat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`."""
        try:
            st = self._resolve(path).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StorageStat(size=st.st_size, mtime=st.st_mtime, version=_version(st))

    def read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range`."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length}")
        full = self._resolve(path)
        try:
            with open(full, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"{full}: no such file", url=self.url(path)) from exc

    def list_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`."""
        full = self._resolve(prefix, allow_root=True)
        try:
            return sorted(child.name for child in full.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, path: str) -> None:
        """See :meth:`Storage.remove`."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._resolve(path).unlink()

    def remove_dir(self, path: str) -> None:
        """See :meth:`Storage.remove_dir`."""
        with contextlib.suppress(OSError):
            self._resolve(path).rmdir()

    def flush(self) -> None:
        """See :meth:`Storage.flush`: a no-op, nothing is buffered."""

    def close(self) -> None:
        """Nothing to close; present for symmetry with the cloud backends."""

    async def aclose(self) -> None:
        """Nothing to close; present for symmetry with the cloud backends."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- async: the sync methods in a worker thread ----------------------------------

    async def aread_internal(self, name: str, *, limit: int | None = None) -> bytes:
        """Read ``.evalsyncd/{name}`` under the root (the daemon's own files, such as the
        catalog); with ``limit``, at most its first ``limit`` bytes."""
        if limit is not None:
            return await self.aread_range(f"{INTERNAL_DIR}/{name}", 0, limit)
        return await self.aread(f"{INTERNAL_DIR}/{name}")

    async def awrite_internal(self, name: str, data: bytes) -> None:
        """Replace ``.evalsyncd/{name}`` under the root, atomically."""
        await self.awrite(f"{INTERNAL_DIR}/{name}", data)

    async def acreate_internal(self, name: str, data: bytes) -> None:
        """See :meth:`Backend.acreate_internal`: a complete temporary file, hard-linked.

        Raises:
            ConflictError: ``.evalsyncd/{name}`` exists.
        """
        await asyncio.to_thread(self._create_exclusive, f"{INTERNAL_DIR}/{name}", data)

    def _create_exclusive(self, path: str, data: bytes) -> None:
        full = self._resolve(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        tmp = full.with_name(f".{full.name}.{os.getpid()}.{id(data):x}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, full)  # atomic and exclusive, NFS included (unlike O_EXCL on old NFS)
            except FileExistsError:
                raise ConflictError(
                    f"{self.url(path)}: the file exists", url=self.url(path)
                ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir(full.parent)

    def read_internal(self, name: str, *, limit: int | None = None) -> bytes:
        """See :meth:`aread_internal`."""
        if limit is not None:
            return self.read_range(f"{INTERNAL_DIR}/{name}", 0, limit)
        return self.read(f"{INTERNAL_DIR}/{name}")

    def write_internal(self, name: str, data: bytes) -> None:
        """See :meth:`awrite_internal`."""
        self.write(f"{INTERNAL_DIR}/{name}", data)

    async def aread(self, path: str) -> bytes:
        """See :meth:`Storage.read`."""
        return await asyncio.to_thread(self.read, path)

    async def awrite(self, path: str, data: bytes) -> str | None:
        """See :meth:`Storage.write`."""
        return await asyncio.to_thread(self.write, path, data)

    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """See :meth:`Storage.append`."""
        return await asyncio.to_thread(self.append, path, data, offset=offset)

    async def aexists(self, path: str) -> bool:
        """See :meth:`Storage.exists`."""
        return await asyncio.to_thread(self.exists, path)

    async def astat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`."""
        return await asyncio.to_thread(self.stat, path)

    async def aread_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range`."""
        return await asyncio.to_thread(self.read_range, path, offset, length)

    async def alist_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`."""
        return await asyncio.to_thread(self.list_dir, prefix)

    async def aremove(self, path: str) -> None:
        """See :meth:`Storage.remove`."""
        await asyncio.to_thread(self.remove, path)

    async def aremove_dir(self, path: str) -> None:
        """See :meth:`Storage.remove_dir`."""
        await asyncio.to_thread(self.remove_dir, path)

    async def aflush(self) -> None:
        """See :meth:`Storage.flush`."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass
