"""The daemon's settings: one typed, frozen tree with explicit precedence.

Precedence, highest first (pydantic-settings "field value priority"):

1. arguments given by the CLI (``--root``, ``--to``);
2. environment variables: prefix ``EVALSYNCD_``, ``__`` between nested keys
   (``EVALSYNCD_FLUSH_INTERVAL_S=2``, ``EVALSYNCD_DESTINATIONS='[{"name": ...}]'``);
3. the TOML file (``--config PATH`` or ``EVALSYNCD_CONFIG``);
4. the defaults below.

Every key, with its unit and default, is documented in ``config.example.toml``.
Invalid settings raise :class:`~evalsyncd.errors.ConfigError` with one message
naming each offending key; the CLI turns it into exit status 78 (EX_CONFIG).

::

    Settings                          root, state_dir, intervals, logging, metrics
    └── destinations: list of         the URL's scheme picks the class
        ├── S3DestinationSettings     s3://   common keys + S3Storage's
        ├── GCSDestinationSettings    gs://   common keys + GCSStorage's
        └── LocalDestinationSettings  file:// common keys + LocalStorage's
            └── retry: RetrySettings  backoff and the clients' timeouts
    └── retention: RetentionSettings  evicting mirrored runs from the local disk

URLs are parsed by :func:`evalsyncd.storage.urls.parse_url` only. Validation has
no side effects: loading settings creates nothing on disk; the service creates
``state_dir`` when it starts (:func:`ensure_state_dir`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from evalsyncd.errors import ConfigError
from evalsyncd.storage.urls import parse_url

log = logging.getLogger("evalsyncd.config")

RETIRED_S3_KEYS: frozenset[str] = frozenset({"max_segments", "compact_ratio", "segment_max_lag_s"})
"""Keys of S3 destinations that older versions had (the S3 segment log): accepted and
ignored, each with a ``config_key_ignored`` warning (stdlib logging, logger
``evalsyncd.config``)."""

__all__ = [
    "DESTINATION_SETTINGS",
    "RETIRED_S3_KEYS",
    "AnyDestinationSettings",
    "DestinationSettings",
    "GCSDestinationSettings",
    "LocalDestinationSettings",
    "RetentionSettings",
    "RetrySettings",
    "S3DestinationSettings",
    "Settings",
    "default_state_dir",
    "ensure_state_dir",
    "for_scheme",
    "load_settings",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PLACEHOLDERS = ("{hostname}",)
"""Placeholders a destination URL may hold, expanded at load."""
_PLACEHOLDER_RE = re.compile(r"\{[^{}/]*\}")
_SETTING_RE = re.compile(r"^[a-z_]+(\.[a-z0-9_]+)*: ")
_S3_MIN_PART_BYTES = 5 * 1024 * 1024
"""S3's minimum multipart part size (``evalsyncd.storage.s3.MULTIPART_MIN_BYTES``), bytes."""


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``), else ``$XDG_STATE_HOME/evalsyncd``,
    else ``~/.local/state/evalsyncd``."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "evalsyncd"


class RetrySettings(BaseModel):
    """How a destination retries. Transient errors back off exponentially with equal
    jitter: with ``cap = min(max_backoff_s, initial_backoff_s * 2**(n-1))``, the n-th
    consecutive failure waits a random time in ``[cap/2, cap]``. Permanent errors
    (access denied, no such bucket) park the destination for ``parked_retry_s``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    initial_backoff_s: float = Field(0.5, gt=0, description="first backoff cap, seconds")
    max_backoff_s: float = Field(60.0, gt=0, description="largest backoff, seconds")
    parked_retry_s: float = Field(
        300.0, gt=0, description="retry period of a parked destination, seconds"
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout, seconds")
    read_timeout_s: float = Field(60.0, gt=0, description="per-request read timeout, seconds")

    @model_validator(mode="after")
    def _caps(self) -> RetrySettings:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be >= initial_backoff_s")
        return self


class DestinationSettings(BaseModel):
    """One mirror target: the keys every destination has.

    The scheme of ``url`` picks the subclass a configuration file gets, with the
    keys of its backend: :class:`S3DestinationSettings` (``s3://``),
    :class:`GCSDestinationSettings` (``gs://``), :class:`LocalDestinationSettings`
    (``file://``); :data:`DESTINATION_SETTINGS` maps each scheme of
    :data:`evalsyncd.storage.urls.SCHEMES` to its class. A key of another
    backend is an unknown key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="unique name, used in logs, metrics and the journal")
    url: str = Field(
        description="s3://bucket/prefix, gs://bucket/prefix or file:///dir; {hostname} is expanded"
    )
    max_concurrency: int = Field(8, ge=1, le=256, description="requests in flight at once")
    compact_idle_s: float = Field(
        10.0,
        gt=0,
        description="a file quiet this long gets its main object brought up to date, seconds",
    )
    max_main_lag_s: float = Field(
        60.0,
        ge=0,
        description="tail log: main objects are at most this far behind the tail, seconds; "
        "0 turns the tail log off (every main object exact after each flush)",
    )
    tail_max_pieces: int = Field(
        32,
        ge=1,
        le=1000,
        description="tail log: a file with this many pending pieces gets its main object "
        "brought up to date (bounds the index and a cold read)",
    )
    direct_append_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="new bytes of one file in one flush from which they go straight to the "
        "main object when the backend appends in place (GCS compose; S3 >= 5 MiB), bytes",
    )
    max_upload_bytes_per_s: int | None = Field(
        None, gt=0, description="bandwidth limit of this destination's uploads, bytes per second"
    )
    reap_interval_s: float = Field(
        6 * 3600.0,
        gt=0,
        description="while the daemon runs, leftovers of failed cleanups (GCS compose deltas, "
        "S3 multipart uploads) are looked for this often (one listing), and sooner after a "
        "cleanup failed, seconds",
    )
    reap_min_age_s: float = Field(
        3600.0,
        gt=0,
        description="leftovers younger than this are never removed (an append may be using "
        "them): at least the longest append, seconds",
    )
    retry: RetrySettings = Field(default_factory=RetrySettings)  # type: ignore[arg-type]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        unknown = sorted({m for m in _PLACEHOLDER_RE.findall(v) if m not in _PLACEHOLDERS})
        if unknown:
            raise ValueError(
                f"{v!r}: unknown placeholder {', '.join(unknown)}; "
                f"known: {', '.join(_PLACEHOLDERS)}"
            )
        v = v.replace("{hostname}", socket.gethostname())
        parse_url(v, strict=True)
        return v

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments of the backend's constructor (beyond the location).

        The base class has none (the backend's defaults); each scheme's subclass
        returns every backend setting it exposes.
        """
        return {}


class S3DestinationSettings(DestinationSettings):
    """An ``s3://bucket/prefix`` destination: the keys of :class:`~evalsyncd.storage.S3Storage`.

    Credentials come from the standard AWS chain (environment, shared files,
    ``profile``, instance metadata). The connect and read timeouts are
    ``retry.connect_timeout_s`` and ``retry.read_timeout_s``.
    """

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, "
        "else AWS)",
    )
    region: str | None = Field(
        None, description="AWS region (default: the profile's or environment's, else us-east-1)"
    )
    profile: str | None = Field(None, description="AWS shared-config profile")
    addressing_style: Literal["path", "virtual", "auto"] | None = Field(
        None, description='bucket addressing (default: "path" with an endpoint_url, else "auto")'
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="attempts per request by botocore, the first included"
    )
    max_pool_connections: int = Field(32, ge=1, le=1024, description="HTTP connections per client")
    multipart_threshold: int = Field(
        _S3_MIN_PART_BYTES,
        ge=_S3_MIN_PART_BYTES,
        description="size of a main object from which appends are multipart uploads that "
        "copy it on the server (at least S3's minimum part, 5 MiB), bytes",
    )

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data: Any) -> Any:
        """Accept and ignore the keys of the retired S3 segment log, with a log line."""
        if isinstance(data, dict) and RETIRED_S3_KEYS & data.keys():
            data = dict(data)
            for key in sorted(RETIRED_S3_KEYS & data.keys()):
                del data[key]
                # stdlib logging: settings load before the CLI configures logging, and
                # stdout may carry --json output; unconfigured, this goes to stderr
                log.warning(
                    "config_key_ignored: destination %r: %s is no longer used (S3 append "
                    "segments were removed: below 5 MiB an append rewrites the object "
                    "with If-Match); delete it from the configuration",
                    data.get("name"),
                    key,
                )
        return data

    cache_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="memory for the bytes of small objects this daemon wrote "
        "(an append below 5 MiB then needs no download), bytes",
    )
    lean_puts: bool = Field(
        True,
        description="send PutObjects of up to 1 MiB without the SDK's request pipeline "
        "(botocore's URL, CA bundle and proxy; awscrt's SigV4; aiohttp); what it cannot "
        "finish goes again through the SDK. false: every request through the SDK",
    )

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~evalsyncd.storage.S3Storage`."""
        return {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "profile": self.profile,
            "connect_timeout_s": self.retry.connect_timeout_s,
            "read_timeout_s": self.retry.read_timeout_s,
            "max_attempts": self.max_attempts,
            "addressing_style": self.addressing_style,
            "max_pool_connections": self.max_pool_connections,
            "multipart_threshold": self.multipart_threshold,
            "cache_max_bytes": self.cache_max_bytes,
            "lean_puts": self.lean_puts,
        }


class GCSDestinationSettings(DestinationSettings):
    """A ``gs://bucket/prefix`` destination: the keys of :class:`~evalsyncd.storage.GCSStorage`.

    The connect timeout is ``retry.connect_timeout_s``; ``retry.read_timeout_s``
    bounds each whole request.
    """

    endpoint_url: str | None = Field(
        None, description="GCS endpoint (default: STORAGE_EMULATOR_HOST, else Google)"
    )
    service_file: str | None = Field(
        None, description="service-account JSON key file (default: Application Default Credentials)"
    )
    page_size: int = Field(1000, ge=1, le=1000, description="objects per listing request")

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~evalsyncd.storage.GCSStorage`."""
        return {
            "service_file": self.service_file,
            "endpoint_url": self.endpoint_url,
            "timeout_s": self.retry.read_timeout_s,
            "connect_timeout_s": self.retry.connect_timeout_s,
            "page_size": self.page_size,
        }


class LocalDestinationSettings(DestinationSettings):
    """A ``file:///dir`` destination (an NFS-style mirror): :class:`~evalsyncd.storage.LocalStorage`.

    The directory is created when the daemon opens the destination.
    """

    durable: bool = Field(
        True, description="fsync every write and rename (acknowledgements survive power loss)"
    )

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~evalsyncd.storage.LocalStorage`."""
        return {"durable": self.durable}


DESTINATION_SETTINGS: dict[str, type[DestinationSettings]] = {
    "s3": S3DestinationSettings,
    "gs": GCSDestinationSettings,
    "file": LocalDestinationSettings,
}
"""The settings class of each scheme of :data:`evalsyncd.storage.urls.SCHEMES`."""


class _UnknownSchemeDestination(DestinationSettings):
    """What a destination with a missing or invalid URL is validated as: its keys are
    not checked against a backend, so the URL's error is not buried under others."""

    model_config = ConfigDict(extra="ignore", frozen=True)


_BAD_URL = "invalid url"


def _scheme_tag(value: Any) -> str:
    """The tag of a destination's settings class: its URL's scheme (see ``SCHEMES``)."""
    url = value.get("url") if isinstance(value, dict) else getattr(value, "url", None)
    if not isinstance(url, str):
        return _BAD_URL
    try:
        return parse_url(url, strict=True).scheme
    except ValueError:
        return _BAD_URL


AnyDestinationSettings: TypeAlias = Annotated[
    Annotated[S3DestinationSettings, Tag("s3")]
    | Annotated[GCSDestinationSettings, Tag("gs")]
    | Annotated[LocalDestinationSettings, Tag("file")]
    | Annotated[_UnknownSchemeDestination, Tag(_BAD_URL)],
    Discriminator(_scheme_tag),
]
"""A destination's settings, of the class its URL's scheme picks."""

_TAGS = frozenset({*DESTINATION_SETTINGS, _BAD_URL})


def for_scheme(dest: DestinationSettings) -> DestinationSettings:
    """``dest`` as the settings class of its URL's scheme (a base instance built in code
    gets its backend's defaults).

    Raises:
        ValueError: the URL is not valid (only possible for an unvalidated instance).
    """
    cls = DESTINATION_SETTINGS[parse_url(dest.url, strict=True).scheme]
    return dest if type(dest) is cls else cls.model_validate(dest.model_dump())


class RetentionSettings(BaseModel):
    """Eviction of mirrored runs from the local disk (``[retention]``; off by default).

    A run may be evicted once it is finalized (``summary.json`` present) and quiet
    for ``min_age_s``, and only after every destination was proven to hold every
    file of it (see :mod:`evalsyncd.sync.retention` and ``docs/operations.md``).
    Runs go oldest first when one reaches ``max_age_s``, or while the filesystem's
    used share is above ``high_water`` until it is below ``low_water``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = Field(False, description="evict mirrored runs from the local disk")
    min_age_s: float = Field(
        3600.0, ge=0, description="a finalized run must be quiet this long, seconds"
    )
    abandoned_after_s: float | None = Field(
        None,
        gt=0,
        description="an open run (no summary.json) quiet this long counts as abandoned and "
        "may be evicted (still only when every byte is safe), seconds; unset: never",
    )
    max_age_s: float | None = Field(
        None, gt=0, description="evict eligible runs quiet this long, seconds; unset: by space only"
    )
    high_water: float | None = Field(
        None, gt=0, lt=1, description="used share of the filesystem that starts eviction (0-1)"
    )
    low_water: float | None = Field(
        None, gt=0, lt=1, description="used share eviction brings the filesystem down to (0-1)"
    )
    interval_s: float = Field(30.0, gt=0, description="time between two eviction rounds, seconds")

    @model_validator(mode="after")
    def _marks(self) -> RetentionSettings:
        if (self.high_water is None) != (self.low_water is None):
            raise ValueError("high_water and low_water go together: set both or neither")
        high, low = self.high_water, self.low_water
        if high is not None and low is not None and low >= high:
            raise ValueError(f"low_water ({low}) must be below high_water ({high})")
        return self


class Settings(BaseSettings):
    """The whole configuration of one daemon (one watched root)."""

    model_config = SettingsConfigDict(
        env_prefix="EVALSYNCD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    root: Path = Field(description="the directory the EvalStore writes (must exist)")
    state_dir: Path = Field(default_factory=default_state_dir, description="journal location")
    flush_interval_s: float = Field(
        1.0, gt=0, description="a file is uploaded at most once per interval, seconds"
    )
    rescan_interval_s: float = Field(60.0, gt=0, description="full rescan period, seconds")
    observer: Literal["auto", "inotify", "polling"] = "auto"
    polling_interval_s: float = Field(2.0, gt=0, description="polling observer period, seconds")
    mirror_deletes: bool = Field(
        False, description="delete remote objects of files deleted locally"
    )
    invalid_json_grace_s: float = Field(
        30.0, ge=0, description="a .json that stays unparseable this long is reported, seconds"
    )
    stop_timeout_s: float = Field(
        20.0, gt=0, description="SIGTERM: how long in-flight uploads may finish, seconds"
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_address: str | None = Field(
        None, description="host:port of the Prometheus endpoint; off when unset"
    )
    destinations: list[AnyDestinationSettings] = Field(min_length=1)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)  # type: ignore[arg-type]

    @field_validator("root")
    @classmethod
    def _root(cls, v: Path) -> Path:
        v = v.expanduser()
        if not v.is_dir():
            raise ValueError(f"{v} is not an existing directory")
        return v.resolve()

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, v: Path) -> Path:
        # No mkdir here: loading settings never touches the disk; the service
        # creates the directory when it starts (ensure_state_dir).
        v = v.expanduser().absolute()
        if v.exists() and not v.is_dir():
            raise ValueError(f"{v} is not a directory")
        if v.is_dir() and not os.access(v, os.W_OK | os.X_OK):
            raise ValueError(f"{v} is not writable")
        return v

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, v: Any) -> Any:
        # A DestinationSettings built in code becomes its scheme's class.
        if isinstance(v, list):
            return [d.model_dump() if isinstance(d, DestinationSettings) else d for d in v]
        return v

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9464")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _no_nesting(self) -> Settings:
        # One prefix, one owner and one tail log: a destination at or under another's
        # prefix would be written by two writers of one daemon (docs/design.md).
        places = [(i, d, _place(d)) for i, d in enumerate(self.destinations)]
        for i, a, (where_a, parts_a) in places:
            for j, b, (where_b, parts_b) in places[i + 1 :]:
                if where_a != where_b:
                    continue
                n = min(len(parts_a), len(parts_b))
                if parts_a[:n] != parts_b[:n]:
                    continue
                how = "the same prefix as" if len(parts_a) == len(parts_b) else "nested with"
                raise ValueError(
                    f"destinations.{j}.url: {b.url} is {how} destinations.{i}.url {a.url}; "
                    "destinations must not nest (each prefix has one writer and one tail "
                    "log): give each its own prefix"
                )
        return self

    @model_validator(mode="after")
    def _mirror_outside_root(self) -> Settings:
        # A file:// mirror at the root would replace the writers' own files with its copies
        # (new inodes: lines of an open file are lost), and one above the root could
        # overwrite them. A mirror inside the root is fine: the daemon leaves it out.
        root = self.root.absolute()
        for i, dest in enumerate(self.destinations):
            where = parse_url(dest.url, strict=True)
            if where.scheme != "file":
                continue
            mirror = Path(where.path).absolute()
            if root == mirror or root.is_relative_to(mirror):
                raise ValueError(
                    f"destinations.{i}.url: {dest.url} is the watched root {root} or a "
                    "directory above it; mirror to a directory outside the root, or inside it"
                )
        return self


def _place(dest: DestinationSettings) -> tuple[tuple[str, str, str | None], tuple[str, ...]]:
    """``((scheme, bucket, endpoint), prefix segments)`` of a destination: two whose first
    parts are equal and whose segments start alike nest."""
    where = parse_url(dest.url, strict=True)
    endpoint = getattr(dest, "endpoint_url", None)
    if where.scheme == "file":
        return ("file", "", None), Path(where.path).absolute().parts
    parts = tuple(s for s in where.path.split("/") if s)
    return (where.scheme, where.bucket, endpoint), parts


def ensure_state_dir(settings: Settings) -> Path:
    """Create ``settings.state_dir`` (and its parents) if missing; the service calls
    this when it starts (validation never touches the disk).

    Returns:
        The directory.

    Raises:
        ConfigError: it cannot be created or is not writable; the message names
            ``state_dir``.
    """
    path = settings.state_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir: {path} is not writable")
    return path


def _key(loc: tuple[int | str, ...]) -> str:
    """``destinations.0.url`` from an error location (without the union's scheme tag)."""
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "destinations" and parts[2] in _TAGS:
        del parts[2]
    return ".".join(str(p) for p in parts) or "(top level)"


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = _key(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if not err["loc"] and _SETTING_RE.match(msg):
            lines.append(f"{source}: {msg}")  # a check of several keys names the one at fault
            continue
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, environment, TOML file and defaults.

    Args:
        config_path: the TOML file; ``None`` reads ``$EVALSYNCD_CONFIG`` if set.
        **overrides: top-level keys with the highest precedence (CLI flags);
            ``None`` values are ignored.

    Returns:
        The validated, frozen settings.

    Raises:
        ConfigError: the file is missing or not valid TOML, or a key is unknown,
            mistyped or invalid; the message names the file and each key.
    """
    if config_path is None and os.environ.get("EVALSYNCD_CONFIG"):
        config_path = os.environ["EVALSYNCD_CONFIG"]
    path = Path(config_path).expanduser() if config_path is not None else None
    if path is not None:
        try:
            with path.open("rb") as f:
                tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None

    class _Sourced(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    kwargs = {k: v for k, v in overrides.items() if v is not None}
    try:
        return _Sourced(**kwargs)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(path) if path else "configuration")) from None
