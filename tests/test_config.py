"""The URL registry, per-scheme destination settings, and settings that load without side effects."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from evalsyncd.config import (
    DESTINATION_SETTINGS,
    DestinationSettings,
    GCSDestinationSettings,
    LocalDestinationSettings,
    S3DestinationSettings,
    load_settings,
)
from evalsyncd.errors import ConfigError
from evalsyncd.storage import GCSStorage, LocalStorage, S3Storage, storage_from_uri
from evalsyncd.storage.urls import SCHEMES, parse_url
from evalsyncd.sync.service import Service, open_destination_storage
from tests.opshelpers import evalsyncd

REPO = Path(__file__).resolve().parents[1]


# -- the registry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "bucket", "path"),
    [
        ("s3://b/evals/h1", "s3", "b", "evals/h1"),
        ("S3://b/x", "s3", "b", "x"),
        ("gs://b", "gs", "b", ""),
        ("gs://b/", "gs", "b", ""),
        ("file:///mnt/m", "file", "", "/mnt/m"),
        ("file://localhost/mnt/m%20x", "file", "", "/mnt/m x"),
        ("/mnt/m", "file", "", "/mnt/m"),
        ("relative/dir", "file", "", "relative/dir"),
    ],
)
def test_parse_url_reads_each_scheme(url: str, scheme: str, bucket: str, path: str) -> None:
    """parse_url gives the registry's scheme, the bucket and the prefix (or directory)."""
    parsed = parse_url(url)
    assert (parsed.scheme, parsed.bucket, parsed.path) == (scheme, bucket, path)
    assert parsed.bare is ("://" not in url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h/p", "unsupported scheme 'ftp'"),
        ("s3://", "no bucket name"),
        ("s3:b/x", "no bucket name"),
        ("gs:///x", "no bucket name"),
        ("file://otherhost/x", "local path"),
    ],
)
def test_parse_url_errors_name_the_url(url: str, message: str) -> None:
    """Each rejected URL raises ValueError naming it; an unknown scheme also lists the allowed."""
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_url(url)
    assert repr(url) in str(info.value)
    if "scheme" in message:
        for form in ("s3://bucket/prefix", "gs://bucket/prefix", "file:///dir", "directory"):
            assert form in str(info.value)


@pytest.mark.parametrize(
    "url", ["/mnt/m", "relative", "file://localhost/x", "FILE:///x", "file:rel"]
)
def test_strict_parse_rejects_paths_and_relative_file_urls(url: str) -> None:
    """What a configuration file may not say: a bare path, or a file: URL not file:///abs."""
    parse_url(url)  # fine for storage_from_uri
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        parse_url(url, strict=True)


def test_every_scheme_has_a_settings_class() -> None:
    """The config's per-scheme settings classes are keyed by exactly the registry's schemes."""
    assert set(DESTINATION_SETTINGS) == set(SCHEMES)


def test_storage_from_uri_opens_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """storage_from_uri gives each scheme's backend, the S3 endpoint from the environment."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)  # set by the cloud fixtures
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    s3 = storage_from_uri("S3://b/p")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("b", "p", "http://127.0.0.1:1")
    assert isinstance(storage_from_uri("gs://b/p"), GCSStorage)
    with pytest.raises(ValueError, match="unsupported scheme"):
        storage_from_uri("ftp://h/p")


# -- per-scheme settings --------------------------------------------------------------------


def _settings(tmp_path: Path, *dests: dict[str, Any]) -> Any:
    (tmp_path / "root").mkdir(exist_ok=True)
    return load_settings(
        root=tmp_path / "root", state_dir=tmp_path / "state", destinations=list(dests)
    )


# Constructor parameters that are the location, or that the daemon sets itself.
_NOT_SETTINGS = {"self", "bucket", "prefix", "root", "mkdir"}


@pytest.mark.parametrize(
    ("cls", "backend"),
    [
        (S3DestinationSettings, S3Storage),
        (GCSDestinationSettings, GCSStorage),
        (LocalDestinationSettings, LocalStorage),
    ],
)
def test_settings_expose_every_backend_parameter(
    cls: type[DestinationSettings], backend: type
) -> None:
    """storage_options() of each scheme passes every constructor parameter of its backend."""
    url = {S3Storage: "s3://b/p", GCSStorage: "gs://b/p", LocalStorage: "file:///tmp/m"}[backend]
    options = cls(name="d", url=url).storage_options()
    params = set(inspect.signature(backend.__init__).parameters) - _NOT_SETTINGS
    assert set(options) == params


def test_defaults_match_the_backends() -> None:
    """A destination with no backend keys configures its backend with the backend's defaults
    (apart from the timeouts of the retry table)."""
    for cls, backend, url in [
        (S3DestinationSettings, S3Storage, "s3://b/p"),
        (GCSDestinationSettings, GCSStorage, "gs://b/p"),
    ]:
        options = cls(name="d", url=url).storage_options()
        defaults = {
            n: p.default
            for n, p in inspect.signature(backend.__init__).parameters.items()
            if n not in _NOT_SETTINGS and "timeout" not in n
        }
        assert {k: v for k, v in options.items() if k in defaults} == defaults


def test_url_scheme_picks_the_settings_class(tmp_path: Path) -> None:
    """Each destination table is validated as its URL's scheme's class."""
    s = _settings(
        tmp_path,
        {"name": "a", "url": "s3://b/p", "region": "eu-west-1", "addressing_style": "virtual"},
        {"name": "b", "url": "gs://b/p", "page_size": 10},
        {"name": "c", "url": (tmp_path / "m").as_uri(), "durable": False},
    )
    assert [type(d) for d in s.destinations] == [
        S3DestinationSettings,
        GCSDestinationSettings,
        LocalDestinationSettings,
    ]
    assert s.destinations[0].region == "eu-west-1"


@pytest.mark.parametrize(
    ("dest", "key"),
    [
        ({"url": "gs://b/p", "region": "x"}, "destinations.0.region: unknown key"),
        ({"url": "s3://b/p", "service_file": "x"}, "destinations.0.service_file: unknown key"),
        ({"url": "file:///tmp/m", "endpoint_url": "x"}, "destinations.0.endpoint_url: unknown key"),
        ({"url": "s3://b/p", "multipart_threshold": 1024}, "destinations.0.multipart_threshold"),
        ({"url": "s3://b/p", "addressing_style": "odd"}, "destinations.0.addressing_style"),
        ({"url": "gs://b/p", "page_size": 1001}, "destinations.0.page_size"),
    ],
)
def test_backend_keys_are_checked_per_scheme(
    tmp_path: Path, dest: dict[str, Any], key: str
) -> None:
    """A key of another backend is unknown; a bad backend value names its key (no scheme tag)."""
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, {"name": "d", **dest})
    assert key in str(info.value)
    assert ".s3." not in str(info.value) and ".gs." not in str(info.value)


def test_an_invalid_url_is_the_only_error_reported(tmp_path: Path) -> None:
    """With an unknown scheme, the message is the URL's (naming it and the allowed schemes),
    not a list of keys unknown to some backend."""
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, {"name": "d", "url": "ftp://h/p", "endpoint_url": "x"})
    (line,) = str(info.value).splitlines()
    assert "destinations.0.url" in line and "'ftp://h/p'" in line and "s3://bucket/prefix" in line


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("s3://b", True),
        ("S3://b/x", True),
        ("gs://b/{hostname}", True),
        ("file:///tmp/x", True),
        ("s3://", False),
        ("ftp://h/p", False),
        ("/tmp/x", False),
        ("file://localhost/tmp/x", False),
        ("FILE:///tmp/x", False),
    ],
)
def test_config_accepts_the_urls_it_always_did(tmp_path: Path, url: str, ok: bool) -> None:
    """The destination URLs a configuration accepts and rejects are those of before the registry."""
    if ok:
        _settings(tmp_path, {"name": "d", "url": url})
    else:
        with pytest.raises(ConfigError, match=r"destinations\.0\.url"):
            _settings(tmp_path, {"name": "d", "url": url})


def test_open_destination_storage_passes_every_setting(tmp_path: Path) -> None:
    """The backend of a destination gets its settings: backend keys and retry timeouts."""
    s = _settings(
        tmp_path,
        {
            "name": "a",
            "url": "s3://b/p",
            "endpoint_url": "http://127.0.0.1:1",
            "max_attempts": 5,
            "multipart_threshold": 8 * 1024 * 1024,
            "cache_max_bytes": 1024,
            "retry": {"read_timeout_s": 7.0},
        },
        {"name": "b", "url": "gs://b/p", "page_size": 10, "retry": {"connect_timeout_s": 3.0}},
        {"name": "c", "url": (tmp_path / "m").as_uri(), "durable": False},
    )
    s3, gcs, local = (open_destination_storage(d) for d in s.destinations)
    assert isinstance(s3, S3Storage) and isinstance(gcs, GCSStorage)
    assert isinstance(local, LocalStorage)
    assert (s3.max_attempts, s3.multipart_threshold, s3.cache_max_bytes) == (
        5,
        8 * 1024 * 1024,
        1024,
    )
    assert (s3.read_timeout_s, s3.endpoint_url) == (7.0, "http://127.0.0.1:1")
    assert (gcs.page_size, gcs.connect_timeout_s) == (10, 3.0)
    assert local.durable is False


def test_a_base_destination_gets_its_schemes_defaults(tmp_path: Path) -> None:
    """DestinationSettings built in code (no backend keys) works in Settings and opens its backend."""
    base = DestinationSettings(name="a", url="gs://b/p")
    s = _settings(tmp_path, base)  # type: ignore[arg-type]
    assert type(s.destinations[0]) is GCSDestinationSettings
    storage = open_destination_storage(base)
    assert isinstance(storage, GCSStorage) and storage.page_size == 1000


def test_example_config_documents_every_key() -> None:
    """Every key of every destination settings class appears in config.example.toml."""
    text = (REPO / "config.example.toml").read_text()
    for cls in DESTINATION_SETTINGS.values():
        for key in cls.model_fields:
            if key != "retry":
                assert re.search(rf"^#? ?{key} = ", text, re.M), (cls.__name__, key)


# -- no side effects ------------------------------------------------------------------------


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_loading_settings_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings creates no directory: not state_dir (given or default), not a file:// mirror."""
    (tmp_path / "root").mkdir()
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'root = "{tmp_path / "root"}"\n'
        f'[[destinations]]\nname = "m"\nurl = "{(tmp_path / "mirror").as_uri()}"\n'
    )
    before = _tree(tmp_path)
    settings = load_settings(cfg)
    load_settings(cfg, state_dir=tmp_path / "a" / "b")
    assert settings.state_dir == tmp_path / "xdg" / "evalsyncd"
    assert _tree(tmp_path) == before


def test_state_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    """A state_dir naming an existing file is rejected at load, naming state_dir."""
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="state_dir"):
        load_settings(
            root=tmp_path,
            state_dir=tmp_path / "f",
            destinations=[{"name": "m", "url": (tmp_path / "m").as_uri()}],
        )


def test_service_creates_the_state_dir_when_it_opens(tmp_path: Path) -> None:
    """Service.open creates state_dir; if it cannot, ConfigError names state_dir."""
    (tmp_path / "root").mkdir()
    dest = {"name": "m", "url": (tmp_path / "m").as_uri()}
    good = load_settings(
        root=tmp_path / "root", state_dir=tmp_path / "s" / "t", destinations=[dest]
    )
    (tmp_path / "file").write_text("")
    bad = load_settings(
        root=tmp_path / "root", state_dir=tmp_path / "file" / "sub", destinations=[dest]
    )

    async def scenario() -> None:
        service = Service(good)
        await service.open()
        await service.close()
        with pytest.raises(ConfigError, match=r"state_dir: cannot create .*file/sub"):
            await Service(bad).open()

    asyncio.run(scenario())
    assert (tmp_path / "s" / "t").is_dir()


@pytest.mark.parametrize("where", ["root", "parent"])
def test_a_local_mirror_at_or_above_the_root_is_refused(tmp_path: Path, where: str) -> None:
    """A file:// mirror equal to the root (it would replace the writers' files) or above it
    is a configuration error naming the destination's url; one inside the root is fine."""
    root = tmp_path / "root"
    root.mkdir()
    mirror = root if where == "root" else tmp_path
    with pytest.raises(ConfigError, match=r"destinations\.0\.url: .* is the watched root"):
        load_settings(root=root, destinations=[{"name": "m", "url": mirror.as_uri()}])
    inside = load_settings(root=root, destinations=[{"name": "m", "url": (root / "m").as_uri()}])
    assert inside.destinations[0].url == (root / "m").as_uri()


@pytest.mark.parametrize("url", ["s3://b/../x", "gs://b/a/../../x", "s3://b/./x"])
def test_cloud_prefixes_that_escape_the_bucket_are_refused(url: str) -> None:
    """A '..' or '.' segment in a cloud URL's prefix is refused by the registry, and a backend
    constructed with such a prefix refuses it too (saying it escapes), before any I/O."""
    with pytest.raises(ValueError, match="escapes the bucket"):
        parse_url(url, strict=True)
    from evalsyncd.storage.memory import MemoryStorage

    for cls in (S3Storage, GCSStorage, MemoryStorage):
        with pytest.raises(ValueError, match="invalid prefix"):
            cls("bkt", "a/../b")


@pytest.mark.parametrize(
    ("a", "b", "nests"),
    [
        ("s3://bkt/x", "s3://bkt/x", "the same prefix as"),
        ("s3://bkt/x", "s3://bkt/x/", "the same prefix as"),
        ("s3://bkt/x", "s3://bkt/x/y", "nested with"),
        ("gs://bkt/x/y/z", "gs://bkt/x", "nested with"),
        ("s3://bkt", "s3://bkt/anything", "nested with"),
        ("s3://bkt/x", "s3://bkt/xy", None),
        ("s3://bkt/x", "gs://bkt/x", None),
        ("s3://bkt/x", "s3://other/x", None),
    ],
)
def test_destinations_that_nest_are_refused_naming_both(
    tmp_path: Path, a: str, b: str, nests: str | None
) -> None:
    """Two destinations on one prefix (a trailing '/' is the same prefix) or one under the
    other are a configuration error naming both URLs and the second's key; other buckets,
    schemes and sibling prefixes are fine."""
    dests = [{"name": "a", "url": a}, {"name": "b", "url": b}]
    if nests is None:
        assert len(load_settings(root=tmp_path, destinations=dests).destinations) == 2
        return
    with pytest.raises(ConfigError) as info:
        load_settings(root=tmp_path, destinations=dests)
    assert f"destinations.1.url: {b} is {nests} destinations.0.url {a}" in str(info.value)
    assert "(top level)" not in str(info.value)


def test_the_same_prefix_on_two_s3_endpoints_and_nested_local_mirrors(tmp_path: Path) -> None:
    """One bucket/prefix on two S3 endpoints is two places; file:// mirrors nest by path."""
    two = [
        {"name": "a", "url": "s3://bkt/x", "endpoint_url": "http://127.0.0.1:1"},
        {"name": "b", "url": "s3://bkt/x", "endpoint_url": "http://127.0.0.1:2"},
    ]
    (tmp_path / "r").mkdir()
    assert len(load_settings(root=tmp_path / "r", destinations=two).destinations) == 2
    local = [
        {"name": "a", "url": (tmp_path / "m").as_uri()},
        {"name": "b", "url": (tmp_path / "m" / "sub").as_uri()},
    ]
    with pytest.raises(ConfigError, match=r"destinations\.1\.url: .* is nested with"):
        load_settings(root=tmp_path / "r", destinations=local)


def test_unknown_url_placeholders_and_non_finite_numbers_are_refused(tmp_path: Path) -> None:
    """A URL placeholder typo names the setting and the known placeholders; inf and nan are
    refused for every float setting (TOML allows them), by file and by environment, exit 78."""
    with pytest.raises(ConfigError) as info:
        load_settings(root=tmp_path, destinations=[{"name": "a", "url": "s3://b/{hostnme}/x"}])
    assert "destinations.0.url" in str(info.value)
    assert "unknown placeholder {hostnme}; known: {hostname}" in str(info.value)
    ok = load_settings(root=tmp_path, destinations=[{"name": "a", "url": "s3://b/{hostname}"}])
    assert "{" not in ok.destinations[0].url
    for key, where in (
        ("flush_interval_s = inf", "flush_interval_s"),
        ("rescan_interval_s = nan", "rescan_interval_s"),
        ("[retention]\nenabled = true\nmin_age_s = inf", "retention.min_age_s"),
        (
            '[[destinations]]\nname = "b"\nurl = "s3://b/y"\nmax_main_lag_s = inf',
            "destinations.1.max_main_lag_s",
        ),
    ):
        path = tmp_path / "c.toml"
        path.write_text(
            f'root = "{tmp_path}"\n{key if not key.startswith("[") else ""}\n'
            '[[destinations]]\nname = "a"\nurl = "s3://b/x"\n'
            f"{key if key.startswith('[') else ''}\n"
        )
        with pytest.raises(ConfigError, match=rf"{re.escape(where)}: Input should be a finite"):
            load_settings(path)
    out = evalsyncd("status", "--config", str(path))
    assert out.returncode == 78 and "finite" in out.stderr


def test_retired_s3_segment_keys_load_and_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A configuration file of an older version that still sets the S3 segment log's keys
    loads; each key is ignored with one `config_key_ignored` warning naming it."""
    (tmp_path / "root").mkdir()
    config = tmp_path / "old.toml"
    config.write_text(
        f'root = "{tmp_path / "root"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[[destinations]]\n"
        'name = "old"\n'
        'url = "s3://bucket/prefix"\n'
        "max_segments = 32\n"
        "compact_ratio = 2.0\n"
        "segment_max_lag_s = 60.0\n"
    )
    with caplog.at_level("WARNING", logger="evalsyncd.config"):
        settings = load_settings(config)
    (dest,) = settings.destinations
    assert isinstance(dest, S3DestinationSettings) and dest.name == "old"
    ignored = sorted(r.args[1] for r in caplog.records if "config_key_ignored" in r.msg)
    assert ignored == ["compact_ratio", "max_segments", "segment_max_lag_s"]
    assert all(r.levelname == "WARNING" and r.args[0] == "old" for r in caplog.records)
    assert "max_segments" not in open_destination_storage(dest).__dict__
