"""The one exception tree of evalsyncd.

Backends translate SDK errors (botocore, aiohttp, gcloud-aio) into these classes
at their boundary and chain the original (``raise ... from exc``), so callers
decide on retries by type and never by matching message strings::

    EvalsyncdError
    ├── ConfigError                       bad settings; the CLI exits 78 (EX_CONFIG)
    ├── JournalError                      the daemon's journal is damaged, of another root,
    │                                     or of a newer schema (evalsyncd.sync.journal)
    ├── CatalogError                      also ValueError: a run catalog does not parse
    │                                     (evalsyncd.catalog)
    ├── SampleError                       a read of samples (evalsyncd.samples) failed
    │   ├── SampleNotFoundError           also LookupError: no sample at that line
    │   └── SearchPatternError            also ValueError: an invalid search regex
    ├── RunEvictedError                   also PermissionError: a write to a run evicted from
    │                                     the local disk (retention); `evalsyncd restore` it
    ├── RootChangedError                  the watched root is gone or another directory: the
    │                                     daemon sends nothing until it is back
    └── StorageError                      anything a storage backend raises
        ├── ObjectNotFoundError           also FileNotFoundError: the object is missing
        ├── ConflictError                 a precondition failed (HTTP 412, offset mismatch):
        │                                 someone else changed the object; re-read, reconcile
        ├── TransientStorageError         retry with backoff: timeouts, connection resets,
        │                                 HTTP 5xx, 429, S3 SlowDown
        └── PermanentStorageError         retrying the same request will not help
            ├── AccessDeniedError         also PermissionError: 401/403, bad credentials
            ├── BucketNotFoundError       the bucket itself does not exist
            ├── InvalidRequestError       the server refused the request as malformed
            ├── CorruptObjectError        an object evalsyncd wrote (a tail object) is damaged
            │   └── TailPieceMissingError also ObjectNotFoundError: a tail object is shorter
            │                             than its index says (evalsyncd.storage.tail)
            ├── TailConflictError         another writer holds this prefix's tail log
            ├── ServerBehaviourError      the server's answer breaks the S3/GCS contract (a
            │                             missing ETag, a wrong size after an append): a
            │                             feature evalsyncd relies on is missing or broken
            └── PrefixOwnedError          another evalsyncd owns the destination's prefix

Keys that are empty, absolute or contain ``..`` are refused before any request
with a plain :class:`ValueError` (:class:`InvalidKeyError` subclasses both).

An outage is never reported as "missing": only a definite answer from the
server (404 on the object, with the bucket present) becomes
:class:`ObjectNotFoundError`.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "CatalogError",
    "ConfigError",
    "ConflictError",
    "CorruptObjectError",
    "EvalsyncdError",
    "InvalidKeyError",
    "InvalidRequestError",
    "JournalError",
    "ObjectNotFoundError",
    "PermanentStorageError",
    "PrefixOwnedError",
    "RootChangedError",
    "RunEvictedError",
    "SampleError",
    "SampleNotFoundError",
    "SearchPatternError",
    "ServerBehaviourError",
    "StorageError",
    "TailConflictError",
    "TailPieceMissingError",
    "TransientStorageError",
]


class EvalsyncdError(Exception):
    """Root of every error evalsyncd raises on purpose."""


class ConfigError(EvalsyncdError):
    """The configuration is invalid. The message names the offending key or file."""


class JournalError(EvalsyncdError):
    """The journal cannot be opened or read: corrupt, from another root, or a newer schema."""


class CatalogError(EvalsyncdError, ValueError):
    """A catalog object does not parse or has an unsupported version.

    Attributes:
        url: the catalog's URL (also in the message).
    """

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class RootChangedError(EvalsyncdError):
    """The watched root is gone, or is another directory than the one the daemon started
    on (moved away, removed, replaced, a volume unmounted from under it). Nothing is sent
    until it is back: every file would look deleted. The message names the root."""


class RunEvictedError(EvalsyncdError, PermissionError):
    """A write to a run whose files were evicted from the local disk (retention).

    The message names the run and how to bring it back (``evalsyncd restore``).

    Attributes:
        run_id: the run.
    """

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class StorageError(EvalsyncdError):
    """A storage backend failed.

    Attributes:
        url: the URL of the object or prefix concerned, when known.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object (file) does not exist. Also a :class:`FileNotFoundError`."""


class ConflictError(StorageError):
    """A conditional request failed: the object is not in the state the caller expected.

    Raised on HTTP 412 (``If-Match``, ``CopySourceIfMatch``, ``ifGenerationMatch``)
    and when ``append(..., offset=N)`` finds a size other than ``N`` (and the
    append was not already applied).

    Attributes:
        actual_size: the object's size in bytes as seen when the conflict was
            detected, or ``None`` when unknown.
    """

    def __init__(self, message: str, *, url: str | None = None, actual_size: int | None = None):
        super().__init__(message, url=url)
        self.actual_size = actual_size


class TransientStorageError(StorageError):
    """A failure that may succeed later: retry with backoff.

    Timeouts, connection errors and resets, HTTP 5xx, 408, 429 and S3 ``SlowDown``.
    """


class PermanentStorageError(StorageError):
    """A failure that retrying the same request will not fix."""


class AccessDeniedError(PermanentStorageError, PermissionError):
    """The credentials are missing, invalid or lack permission (401/403)."""


class BucketNotFoundError(PermanentStorageError):
    """The bucket does not exist (S3 ``NoSuchBucket``, GCS 404 on the bucket)."""


class InvalidRequestError(PermanentStorageError):
    """The server rejected the request as malformed (HTTP 400 and the like)."""


class InvalidKeyError(EvalsyncdError, ValueError):
    """A storage path is empty, absolute, or contains ``.``/``..`` segments."""


class CorruptObjectError(PermanentStorageError):
    """An object in evalsyncd's own format (a tail object) cannot be parsed.

    The message names the object's URL; retrying the same read will not help.
    """


class TailPieceMissingError(CorruptObjectError, ObjectNotFoundError):
    """A tail object holds fewer bytes than a piece its index places in it.

    A :class:`CorruptObjectError` (readers read the file's plain object instead)
    and, as before this class existed, an :class:`ObjectNotFoundError` (the
    writer treats the piece as gone and stages the bytes again from its file).
    """


class TailConflictError(PermanentStorageError):
    """Another writer (a second daemon on the same prefix) writes this tail log."""


class ServerBehaviourError(PermanentStorageError):
    """The server answered in a way the S3 or GCS contract rules out.

    Examples: an ``UploadPartCopy`` answered 200 without a part ETag, an append
    whose resulting object has another size than the old size plus the delta,
    an object resource without a generation. Retrying the same request will
    not help; ``evalsyncd check URL`` tells which feature the server lacks.

    Attributes:
        feature: the feature concerned (``"UploadPartCopy"``, ``"multipart append"``...).
        answer: what the server answered, in one line.
    """

    def __init__(self, message: str, *, url: str | None = None, feature: str, answer: str):
        super().__init__(message, url=url)
        self.feature = feature
        self.answer = answer


class PrefixOwnedError(PermanentStorageError):
    """Another evalsyncd owns the prefix (its claim ``.evalsyncd/owner.json``).

    The message names the owner's hostname, when it claimed the prefix and the
    fix; the daemon writes nothing under the prefix while this holds.

    Attributes:
        owner_host: the owner's hostname, as its claim says (``None`` when the
            prefix has no claim but another writer's tail log).
        owner_writer: the owner's writer id.
        claimed_at: when the owner claimed the prefix, Unix seconds (``None``: unknown).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        owner_host: str | None = None,
        owner_writer: str = "",
        claimed_at: float | None = None,
    ) -> None:
        super().__init__(message, url=url)
        self.owner_host = owner_host
        self.owner_writer = owner_writer
        self.claimed_at = claimed_at


class SampleError(EvalsyncdError):
    """A read of samples (:mod:`evalsyncd.samples`) cannot be answered."""


class SampleNotFoundError(SampleError, LookupError):
    """No sample at the requested line of a ``trajectories.jsonl`` (the message names its URL)."""


class SearchPatternError(SampleError, ValueError):
    """A search pattern is not a valid regular expression (the message quotes it)."""
