"""What a storage key may be: the one check every backend and the tail log apply.

A leaf module (it imports only the error tree), so that the tail log can check
keys without importing the storage protocol that names the tail writer.
"""

from __future__ import annotations

from evalsyncd.errors import InvalidKeyError

__all__ = ["check_key"]


def check_key(path: str) -> str:
    """Validate a relative storage path and return it unchanged.

    Args:
        path: a relative POSIX path such as ``"runs/r1/metadata.json"``.

    Returns:
        ``path`` itself (no normalisation is applied).

    Raises:
        InvalidKeyError: (a ``ValueError``) if ``path`` is empty, absolute, has an
            empty segment (``a//b``), a ``.`` or ``..`` segment (the message of a
            ``..`` says the key "escapes the storage root", as the reference storage
            tests expect), a NUL byte, or is not valid UTF-8 (a file name decoded
            with ``surrogateescape``).
    """
    if not isinstance(path, str) or not path:
        raise InvalidKeyError(f"invalid storage key {path!r}: empty")
    if path.startswith("/"):
        raise InvalidKeyError(f"invalid storage key {path!r}: absolute path")
    if "\x00" in path:
        raise InvalidKeyError(f"invalid storage key {path!r}: NUL byte")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(f"invalid storage key {path!r}: not valid UTF-8") from None
    for segment in path.rstrip("/").split("/"):
        if segment == "..":
            raise InvalidKeyError(
                f"invalid storage key {path!r}: escapes the storage root ('..' segment)"
            )
        if segment in ("", "."):
            raise InvalidKeyError(f"invalid storage key {path!r}: {segment or 'empty'!r} segment")
    return path
