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
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from evalsyncd.errors import ConfigError

__all__ = ["DestinationSettings", "RetrySettings", "Settings", "default_state_dir", "load_settings"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    """One mirror target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="unique name, used in logs, metrics and the journal")
    url: str = Field(
        description="s3://bucket/prefix, gs://bucket/prefix or file:///dir; {hostname} is expanded"
    )
    endpoint_url: str | None = Field(
        None,
        description="S3 or GCS endpoint (S3 default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS; "
        "GCS default: STORAGE_EMULATOR_HOST / Google)",
    )
    region: str | None = Field(None, description="S3 region")
    profile: str | None = Field(None, description="AWS shared-config profile")
    service_file: str | None = Field(
        None, description="GCS service-account JSON file (default: ADC)"
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
        v = v.replace("{hostname}", socket.gethostname())
        scheme = v.split("://", 1)[0].lower() if "://" in v else ""
        if scheme not in ("s3", "gs", "file"):
            raise ValueError("must start with s3://, gs:// or file:///")
        if scheme in ("s3", "gs") and not v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("has no bucket name")
        if scheme == "file" and not v.startswith("file:///"):
            raise ValueError("file URLs must be absolute: file:///path/to/dir")
        return v


class Settings(BaseSettings):
    """The whole configuration of one daemon (one watched root)."""

    model_config = SettingsConfigDict(
        env_prefix="EVALSYNCD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
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
    destinations: list[DestinationSettings] = Field(min_length=1)

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
        v = v.expanduser().absolute()
        try:
            v.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create {v}: {exc.strerror}") from None
        if not os.access(v, os.W_OK | os.X_OK):
            raise ValueError(f"{v} is not writable")
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


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
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
