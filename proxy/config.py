"""Proxy configuration: one typed, validated object from defaults, a YAML file, `PGVEIL_*`
environment variables and command-line flags (later sources win).

Every setting is declared once in `SETTINGS`; the CLI flags, the environment variable names,
the YAML keys and the README's reference are all derived from it. Validation is strict: an
unknown YAML key, a key given twice or a malformed value is a `ConfigError` whose text
names the source, the key and what is allowed (the file is read by shared.strict_yaml).
This module does no I/O beyond reading the config file, checking
that the files it names exist, and reading the audit key once to check it (never keeping,
logging or printing it: messages name where it is, not what it is).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.anchors import KeyRef, load_key, parse_key_ref
from shared import dsn, user_files
from shared.address import HostPort, parse_host_port
from shared.strict_yaml import StrictYaml


class ConfigError(Exception):
    """A user error in flags, environment or config file; printed as one line, exit 2."""


_SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_size(text: str | int) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().upper().replace(" ", "")
        digits = s.rstrip("KMGB")
        unit = s[len(digits) :]
        if not digits.isdigit() or unit not in _SIZE_UNITS:
            raise ValueError("expected a size in bytes, e.g. 1048576 or 64MB")
        value = int(digits) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _positive_float(text: Any) -> float:
    if isinstance(text, bool):
        raise ValueError("expected a number of seconds")
    value = float(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _positive_int(text: Any) -> int:
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError("expected a whole number")
    value = int(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        s = str(text).strip()
        if s not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return s

    return parse


def _path(text: Any) -> Path:
    s = str(text).strip()
    if not s:
        raise ValueError("expected a file path")
    return Path(s)


def _upstream(text: Any) -> str:
    """HOST:PORT, or a libpq connection string or URI (checked here, read in
    `_server_connection` with the options and the environment)."""
    s = str(text).strip()
    if dsn.is_dsn(s):
        try:
            dsn.parse(s)
        except dsn.DsnError as exc:
            raise ValueError(str(exc)) from exc
        return s
    parse_host_port(s)
    return s


def _conninfo(text: Any) -> str:
    s = str(text).strip()
    try:
        dsn.parse(s)
    except dsn.DsnError as exc:
        raise ValueError(str(exc)) from exc
    return s


def _optional_host_port(text: Any) -> HostPort | None:
    s = str(text).strip()
    return None if s in ("", "off", "none") else parse_host_port(s)


@dataclass(frozen=True)
class Setting:
    name: str  # YAML key; flag is --name-with-dashes; env is PGVEIL_NAME
    parse: Callable[[Any], Any]
    default: Any
    help: str
    reloadable: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "PGVEIL_" + self.name.upper()


SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")

SETTINGS: tuple[Setting, ...] = (
    Setting("listen", parse_host_port, "127.0.0.1:6432", "address clients connect to", False),
    Setting(
        "upstream",
        _upstream,
        None,
        "the PostgreSQL server: HOST:PORT, or a libpq connection string or URI (host, port, "
        "sslmode, sslrootcert; its user, password and other keywords are for pgveil's own "
        "catalog login); what it leaves out comes from the options below, then PGHOST, "
        "PGPORT, PGUSER, PGPASSWORD, PGSSLMODE, PGSSLROOTCERT, ... as libpq reads them, then "
        "127.0.0.1:5432",
        False,
    ),
    Setting("metrics", _optional_host_port, None, "serve /metrics and /healthz here (off)", False),
    Setting("rules", _path, None, "masking rules file (YAML)"),
    Setting(
        "catalog_user",
        str,
        None,
        "pgveil's own login, to read the catalog and role memberships (needed with rules; "
        "else the upstream connection string's user, else PGUSER)",
    ),
    Setting(
        "catalog_password",
        str,
        None,
        "its password (prefer PGVEIL_CATALOG_PASSWORD, PGPASSWORD or a password file: "
        "~/.pgpass or PGPASSFILE, as libpq)",
    ),
    Setting("catalog_refresh", _positive_float, 60.0, "seconds before the catalog is re-read"),
    Setting("audit_file", _path, None, "audit stream file (JSON lines)"),
    Setting("audit_stdout", _bool, "false", "also write audit events to standard output"),
    Setting(
        "audit_on_failure",
        _choice("block", "drop"),
        "block",
        "when an audit sink fails or lags: refuse personal-data statements, or drop events",
    ),
    Setting("audit_queue_size", _positive_int, 10000, "audit events queued before that"),
    Setting(
        "audit_table_dsn",
        _conninfo,
        None,
        "database for the audit table sink (libpq connection string or URI, completed from "
        "the PG* environment and password file as libpq does; prefer PGVEIL_AUDIT_TABLE_DSN)",
    ),
    Setting("audit_table", str, "pgveil.audit_events", "the table sink's table (created)"),
    Setting(
        "audit_chain",
        str,
        None,
        "this instance's hash chain in the table sink (default: host name and listen port)",
    ),
    Setting(
        "audit_key",
        parse_key_ref,
        None,
        "seals the audit checkpoints: env:NAME or file:PATH holding at least 32 bytes, never "
        "the key itself (without one the chain's end and rebuilds cannot be proven)",
        False,
    ),
    Setting(
        "audit_anchor_file",
        _path,
        None,
        "where checkpoints go outside the chain (default: the audit file's name + .anchor); "
        "keep or ship it apart from the audit file",
        False,
    ),
    Setting(
        "audit_checkpoint_every",
        _positive_int,
        1000,
        "audit events between two checkpoints, at most",
        False,
    ),
    Setting(
        "audit_checkpoint_interval",
        _positive_float,
        10.0,
        "seconds between two checkpoints while events come, at most",
        False,
    ),
    Setting("audit_rotate_size", parse_size, "100MB", "audit file size before rotation", False),
    Setting(
        "audit_rotate_age", _positive_float, 86400.0, "audit file age (s) before rotation", False
    ),
    Setting(
        "audit_block_timeout",
        _positive_float,
        5.0,
        "seconds statements wait for a failed audit sink before being refused",
    ),
    Setting(
        "audit_subjects_limit",
        _positive_int,
        100,
        "data subjects listed per audit event (all are counted)",
    ),
    Setting("tls_cert", _path, None, "certificate (PEM) for TLS from clients"),
    Setting("tls_key", _path, None, "private key (PEM) for TLS from clients"),
    Setting(
        "upstream_sslmode",
        _choice(*SSLMODES),
        None,
        "TLS to the server, as libpq's sslmode: " + ", ".join(SSLMODES) + " (else the "
        "upstream connection string's, else PGSSLMODE, else prefer)",
    ),
    Setting(
        "upstream_sslrootcert",
        _path,
        None,
        "CA bundle to verify the server (verify-*; else the connection string's, else "
        "PGSSLROOTCERT, else ~/.postgresql/root.crt if it exists, as libpq)",
    ),
    Setting("max_connections", _positive_int, 1000, "client connections; more get SQLSTATE 53300"),
    Setting("connect_timeout", _positive_float, 5.0, "seconds to open the upstream connection"),
    Setting(
        "max_message_size",
        parse_size,
        "128MB",
        "largest message a client may send; larger ends the session with 08P01",
    ),
    Setting(
        "shutdown_timeout",
        _positive_float,
        30.0,
        "seconds sessions get to finish their transaction on SIGTERM",
    ),
    Setting(
        "masked_prepare",
        _bool,
        "true",
        "send a masked role's rewritten SELECTs (Queries, and Parses of the extended "
        "protocol's unnamed statement) as statements prepared once per server "
        "connection (the server parses and analyses the long rewritten text once; new "
        "sessions)",
    ),
    Setting("tcp_keepalive", _bool, "true", "TCP keepalive on both connections"),
    Setting("tcp_keepalive_idle", _positive_int, 60, "seconds idle before keepalive probes"),
    Setting("tcp_keepalive_interval", _positive_int, 10, "seconds between keepalive probes"),
    Setting("tcp_keepalive_count", _positive_int, 6, "failed probes before the peer is dead"),
    Setting("log_format", _choice("json", "text"), "json", "one JSON object per line, or text"),
    Setting(
        "log_level", _choice("debug", "info", "warning", "error"), "info", "least severe level"
    ),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class ProxyConfig:
    listen: HostPort
    upstream: HostPort
    metrics: HostPort | None
    rules: Path | None
    catalog_user: str | None
    catalog_password: str | None = field(repr=False)
    catalog_refresh: float
    audit_file: Path | None
    audit_stdout: bool
    audit_on_failure: str
    audit_queue_size: int
    audit_table_dsn: str | None = field(repr=False)  # may hold a password
    audit_table: str
    audit_chain: str | None
    audit_key: KeyRef | None
    audit_anchor_file: Path | None
    audit_checkpoint_every: int
    audit_checkpoint_interval: float
    audit_rotate_size: int
    audit_rotate_age: float
    audit_block_timeout: float
    audit_subjects_limit: int
    tls_cert: Path | None
    tls_key: Path | None
    upstream_sslmode: str
    upstream_sslrootcert: Path | None
    max_connections: int
    connect_timeout: float
    max_message_size: int
    shutdown_timeout: float
    masked_prepare: bool
    tcp_keepalive: bool
    tcp_keepalive_idle: int
    tcp_keepalive_interval: int
    tcp_keepalive_count: int
    log_format: str
    log_level: str
    config_file: Path | None = None
    # pgveil's own connection to the server (the catalog reader), resolved as libpq would
    # from `upstream`, the catalog and TLS options and the PG* environment (shared.dsn)
    server: dsn.Params | None = None

    def changed_restart_only(self, other: ProxyConfig) -> list[str]:
        """Names of settings that differ and only take effect after a restart."""
        return [
            s.name
            for s in SETTINGS
            if not s.reloadable and getattr(self, s.name) != getattr(other, s.name)
        ]


class _ConfigYaml(StrictYaml):
    error = ConfigError

    def invalid_yaml(self, line: int | None, problem: object) -> Exception:
        where = f" line {line}" if line is not None else ""
        return ConfigError(f"{self.source}:{where} invalid YAML")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = user_files.read_text(path, "config file")
    except user_files.UnreadableFile as exc:
        raise ConfigError(str(exc)) from exc
    data = _ConfigYaml(str(path)).load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of settings")
    proxy_section = data.get("proxy", data) if set(data) == {"proxy"} else data
    if not isinstance(proxy_section, dict):
        raise ConfigError(f"{path}: 'proxy' must be a mapping of settings")
    for key in proxy_section:
        if key not in BY_NAME:
            raise ConfigError(
                f"{path}: unknown key '{key}'; allowed keys: " + ", ".join(sorted(BY_NAME))
            )
    return dict(proxy_section)


def load_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ProxyConfig:
    """Build the configuration. `flags` holds only the options given on the command line."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get("PGVEIL_CONFIG"):
        config_file = Path(environ["PGVEIL_CONFIG"])
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        sources.append((str(config_file), _read_file(config_file)))
    env_values = {s.name: environ[s.env] for s in SETTINGS if s.env in environ}
    sources.append(("environment", {BY_NAME[k].env: v for k, v in env_values.items()}))
    sources.append(("command line", flags))
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw: Any = setting.default
        origin = "default"
        for source_name, source in sources:
            key = setting.name
            if source_name == "environment":
                key = setting.env
            elif source_name == "command line":
                key = setting.name
            if key in source and source[key] is not None:
                raw = source[key]
                origin = source_name
        if raw is None:
            values[setting.name] = None
            continue
        try:
            if isinstance(raw, list | dict):
                raise ValueError("expected a single value, not a list or mapping")
            values[setting.name] = setting.parse(raw)
        except (ValueError, TypeError) as exc:
            label = {
                "environment": setting.env,
                "command line": setting.flag,
                "default": setting.name,
            }.get(origin, f"{origin}: key '{setting.name}'")
            raise ConfigError(f"{label}: {exc}") from exc
    origins = {s.name: _origin_label(s, sources) for s in SETTINGS}
    values, server = _server_connection(values, origins, environ)
    config = ProxyConfig(**values, config_file=config_file, server=server)
    _check(config)
    if config.audit_table_dsn:
        try:
            dsn.resolve(config.audit_table_dsn, environ=environ)
        except dsn.DsnError as exc:
            raise ConfigError(f"{origins['audit_table_dsn']}: {exc}") from exc
    if config.audit_key is not None:
        if not audited(config):
            raise ConfigError("--audit-key: no audit sink is configured")
        try:
            load_key(config.audit_key, environ)  # checked now: a bad key is a loud error
        except ValueError as exc:
            raise ConfigError(f"--audit-key {exc}") from exc
    return config


def _origin_label(setting: Setting, sources: list[tuple[str, Mapping[str, Any]]]) -> str:
    """How a message names where a setting was given: its flag, variable or file key."""
    label = setting.flag
    for source_name, source in sources:
        key = setting.env if source_name == "environment" else setting.name
        if key in source and source[key] is not None:
            label = {"environment": setting.env, "command line": setting.flag}.get(
                source_name, f"{source_name}: key '{setting.name}'"
            )
    return label


DEFAULT_UPSTREAM = HostPort("127.0.0.1", 5432)


def _server_connection(
    values: dict[str, Any], origins: Mapping[str, str], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dsn.Params]:
    """The server, TLS and catalog login, resolved as libpq would (shared.dsn): the upstream
    connection string's keywords, then the options (--upstream HOST:PORT, --catalog-user,
    --catalog-password, --upstream-sslmode, --upstream-sslrootcert), then the service file
    and the PG* environment, then the defaults (127.0.0.1:5432 here: pgveil listens and
    connects over TCP unless told a socket directory)."""
    upstream = values["upstream"]
    text = upstream if upstream is not None and dsn.is_dsn(upstream) else ""
    hp = parse_host_port(upstream) if upstream is not None and not text else None
    rootcert = values["upstream_sslrootcert"]
    options = {
        "host": hp.host if hp else None,
        "port": str(hp.port) if hp else None,
        "user": values["catalog_user"],
        "password": values["catalog_password"],
        "sslmode": values["upstream_sslmode"],
        "sslrootcert": str(rootcert) if rootcert is not None else None,
    }
    labels = {
        "host": origins["upstream"],
        "port": origins["upstream"],
        "user": origins["catalog_user"],
        "password": origins["catalog_password"],
        "sslmode": origins["upstream_sslmode"],
        "sslrootcert": origins["upstream_sslrootcert"],
    }
    try:
        server = dsn.resolve(text, options, environ, labels)
        if text:
            given = dsn.parse(text)
            for keyword in ("dbname", "target_session_attrs", "load_balance_hosts"):
                if given.get(keyword):
                    raise dsn.DsnError(
                        f"{keyword}: pgveil reads every database the rules are for, through "
                        "one server; leave it out"
                    )
        if len(server.hosts) > 1:
            raise dsn.DsnError("pgveil forwards to one server: give one host")
        host = server.get("host") or DEFAULT_UPSTREAM.host
        port = server.ports[0] if server.get("port") else DEFAULT_UPSTREAM.port
    except dsn.DsnError as exc:
        raise ConfigError(f"{origins['upstream']}: {exc}") from exc
    server = server.replace(host=host, port=str(port))
    sslmode = server.get("sslmode")
    root = server.get("sslrootcert")
    if not root and sslmode in ("require", "verify-ca", "verify-full") and server.home:
        default_root = Path(server.home) / ".postgresql" / "root.crt"
        root = str(default_root) if default_root.is_file() else ""
    if sslmode == "require" and root:
        sslmode = "verify-ca"  # libpq: a root certificate makes require verify the server
    out = dict(values)
    out["upstream"] = HostPort(host, port)
    out["upstream_sslmode"] = sslmode
    out["upstream_sslrootcert"] = Path(root) if root else None
    out["catalog_user"] = server.get("user") or None
    out["catalog_password"] = server.password
    return out, server


def audited(config: ProxyConfig) -> bool:
    return bool(config.audit_file or config.audit_stdout or config.audit_table_dsn)


def anchor_file(config: ProxyConfig) -> Path | None:
    """The anchor file: as configured, else beside the audit file (none without one)."""
    if config.audit_anchor_file is not None:
        return config.audit_anchor_file
    if config.audit_file is not None:
        return config.audit_file.with_name(config.audit_file.name + ".anchor")
    return None


def _check(config: ProxyConfig) -> None:
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert and tls_key must be given together")
    for name in ("tls_cert", "tls_key", "upstream_sslrootcert", "rules"):
        path = getattr(config, name)
        if path is None:
            continue
        label = BY_NAME[name].flag
        if name == "upstream_sslrootcert" and config.server is not None:
            label = f"sslrootcert (from {config.server.where('sslrootcert')})"
        try:
            user_files.check_readable(path, label)
        except user_files.UnreadableFile as exc:
            raise ConfigError(f"{label}: {exc.problem}: {path}") from exc
    if config.upstream_sslmode.startswith("verify") and config.upstream_sslrootcert is None:
        raise ConfigError(
            f"sslmode {config.upstream_sslmode} needs a root certificate: "
            "--upstream-sslrootcert, sslrootcert= in --upstream, PGSSLROOTCERT or "
            "~/.postgresql/root.crt"
        )
    if config.rules is not None and not config.catalog_user:
        raise ConfigError(
            "--rules needs --catalog-user (or user= in --upstream, or PGUSER): pgveil reads "
            "the catalog with its own login"
        )
    if config.audit_file is not None and not config.audit_file.parent.is_dir():
        raise ConfigError(f"--audit-file: directory does not exist: {config.audit_file.parent}")
    anchor = config.audit_anchor_file
    if anchor is not None:
        if not audited(config):
            raise ConfigError("--audit-anchor-file: no audit sink is configured")
        if not anchor.parent.is_dir():
            raise ConfigError(f"--audit-anchor-file: directory does not exist: {anchor.parent}")
        if config.audit_file is not None and anchor.resolve() == config.audit_file.resolve():
            raise ConfigError("--audit-anchor-file: must not be the audit file")


def reference_table() -> str:
    """The configuration reference as a Markdown table (the README embeds it; a test
    checks that they agree)."""
    rows = ["| YAML key | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = "—" if s.default is None else f"`{s.default}`"
        rows.append(f"| `{s.name}` | `{s.flag}` | `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)
