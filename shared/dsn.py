"""One way to connect to PostgreSQL for every pgveil command, as libpq does.

Every pgveil command that opens its own connection (the proxy's catalog reader and audit
table sink, `rules check|suggest`, `audit verify|who`, `erase`, `demo --dsn`) goes through
`resolve` and `connect` here, so that they all read a connection the way psql would:

* **A connection string or URI**: `host=db port=5432 dbname=billing` (libpq's key=value
  pairs, values optionally single-quoted, backslash escapes) or
  `postgresql://user@db:5432/billing?sslmode=verify-full` (percent-encoded parts, several
  `host:port` separated by commas). Keywords are libpq's; an unknown one is an error.
* **Precedence** (libpq's `conninfo_add_defaults`): what the connection string says, then
  the command's own options (`--catalog-user`, `--upstream-sslmode`, ...), then the service
  file entry (`service=` or `PGSERVICE`), then the `PG*` environment (`PGHOST`, `PGPORT`,
  `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGAPPNAME`, ...), then the defaults
  (a Unix socket, port 5432, the OS user, a database named like the user).
* **The password file** (`passfile`, `PGPASSFILE`, else `~/.pgpass`): looked up per host
  only when no password was given, at each connection, with libpq's rules: `*` matches
  anything, `\\:` and `\\\\` are a colon and a backslash, a socket in the default directory
  matches `localhost`, and a file that group or others may read is ignored (with a warning).

asyncpg opens the connections; this module only decides with what. Where asyncpg reads
the environment differently from libpq (it ignores `PGSERVICE`, `PGAPPNAME`,
`PGCONNECT_TIMEOUT`, `PGOPTIONS`, reads `$USER` before the OS user, and does not undo the
password file's escapes) the values are resolved here and handed to it explicitly.

What asyncpg cannot do is refused, never ignored: `hostaddr`, `channel_binding=require`,
`require_auth`, `requirepeer`, `gssencmode=require`, `sslcertmode` other than `allow`,
`sslcrldir`, `sslsni=0`, `sslrootcert=system`, `replication`, `gssdelegation=1`, a client
encoding other than UTF8, LDAP service entries. TCP tuning keywords (`keepalives*`,
`tcp_user_timeout`) and `sslcompression` are accepted and have no effect.

Secrets: no password (or `sslpassword`) ever appears in an error, a log line or a repr;
error texts name keywords and where a value came from, never the value, except for
keywords whose values are a fixed set (`sslmode`, ...) and the target (host, port,
database, user).
"""

from __future__ import annotations

import os
import pwd
import random
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg

from shared import user_files

# libpq's connection keywords (PQconninfoOptions in fe-connect.c) -> their environment
# variable. Only these are read from the environment, as libpq does.
KEYWORDS: Mapping[str, str | None] = {
    "service": "PGSERVICE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "channel_binding": "PGCHANNELBINDING",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "dbname": "PGDATABASE",
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "client_encoding": "PGCLIENTENCODING",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "fallback_application_name": None,
    "keepalives": None,
    "keepalives_idle": None,
    "keepalives_interval": None,
    "keepalives_count": None,
    "tcp_user_timeout": None,
    "sslmode": "PGSSLMODE",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcompression": "PGSSLCOMPRESSION",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcertmode": "PGSSLCERTMODE",
    "sslpassword": None,
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "require_auth": "PGREQUIREAUTH",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "gssdelegation": "PGGSSDELEGATION",
    "replication": None,
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}

# libpq's compiled-in defaults (those that matter here)
_DEFAULTS: Mapping[str, str] = {
    "port": "5432",
    "sslmode": "prefer",
    "sslnegotiation": "postgres",
    "sslcertmode": "allow",
    "sslsni": "1",
    "channel_binding": "prefer",
    "gssencmode": "disable",  # no GSSAPI encryption here: libpq built without it
    "gssdelegation": "0",
    "target_session_attrs": "any",
    "load_balance_hosts": "disable",
    "ssl_min_protocol_version": "TLSv1.2",
}

SECRET = frozenset({"password", "sslpassword"})

_CHOICES: Mapping[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslnegotiation": ("postgres", "direct"),
    "target_session_attrs": (
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
    "channel_binding": ("disable", "prefer", "require"),
    "gssencmode": ("disable", "prefer", "require"),
    "sslcertmode": ("disable", "allow", "require"),
    "gsslib": ("gssapi", "sspi"),
}  # fmt: skip

# what asyncpg cannot do, keyword -> (the values it can, why not the others)
_LIMITS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "hostaddr": (("",), "give the address as host"),
    "channel_binding": (("disable", "prefer"), "asyncpg does not do SCRAM channel binding"),
    "require_auth": (("",), "asyncpg cannot restrict the authentication methods"),
    "requirepeer": (("",), "asyncpg cannot check the server process's user"),
    "gssencmode": (("disable", "prefer"), "asyncpg does not do GSSAPI encryption"),
    "sslcertmode": (("allow",), "asyncpg sends a client certificate when one is found"),
    "sslcrldir": (("",), "give a CRL file as sslcrl"),
    "sslsni": (("1",), "asyncpg always sends the server name"),
    "sslrootcert": (("system",), ""),  # the one value refused (see _check)
    "gssdelegation": (("0",), "asyncpg does not delegate GSSAPI credentials"),
    "replication": (("", "0", "false", "off", "no"), "pgveil opens no replication connection"),
}

_UTF8 = ("", "auto", "utf8", "utf-8", "unicode")


class DsnError(ValueError):
    """A connection string, option or environment variable pgveil cannot use. The text
    names keywords and sources, never a value that may be secret."""


class ConnectError(ConnectionError):
    """No connection: unreachable, refused or not authenticated. The text names the target
    (host, port, database, user) and the server's reason; never a password. An OSError (a
    ConnectionError), so that callers that handle an unreachable server handle it too."""


# -- parsing ----------------------------------------------------------------------------


def is_uri(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def is_dsn(text: str) -> bool:
    """Whether libpq would read `text` as a connection string (psql's test)."""
    return is_uri(text) or "=" in text


def _store(out: dict[str, str], keyword: str, value: str, where: str) -> None:
    if keyword == "requiressl":  # libpq's old spelling
        keyword, value = "sslmode", ("require" if value.startswith("1") else "prefer")
    if keyword not in KEYWORDS:
        raise DsnError(f'{where}: invalid connection option "{keyword}"')
    out[keyword] = value


def _parse_conninfo(text: str) -> dict[str, str]:
    """libpq's conninfo_parse: `key = value` pairs separated by white space; a value is a
    word (backslash escapes the next character) or single-quoted (backslash escapes)."""
    out: dict[str, str] = {}
    i, n, word = 0, len(text), 0
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        word += 1
        start = i
        while i < n and text[i] != "=" and not text[i].isspace():
            i += 1
        keyword = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=":
            raise DsnError(
                "expected key=value pairs or a URI: the connection string's word "
                f'{word} has no "=" after it'
            )
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise DsnError("unterminated quoted string in the connection string")
                if text[i] == "\\":
                    i += 1
                    if i < n:
                        value.append(text[i])
                        i += 1
                    continue
                if text[i] == "'":
                    i += 1
                    break
                value.append(text[i])
                i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\":
                    i += 1
                    if i < n:
                        value.append(text[i])
                        i += 1
                else:
                    value.append(text[i])
                    i += 1
        _store(out, keyword, "".join(value), "connection string")
    return out


def _uri_decode(text: str) -> str:
    out = bytearray()
    i = 0
    raw = text.encode()
    while i < len(raw):
        if raw[i] == ord("%"):
            pair = raw[i + 1 : i + 3]
            try:
                byte = int(pair, 16) if len(pair) == 2 else -1
            except ValueError:
                byte = -1
            if byte < 0:
                raise DsnError("invalid percent-encoded token in the connection URI")
            if byte == 0:
                raise DsnError("forbidden value %00 in the connection URI")
            out.append(byte)
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", errors="surrogateescape")


def _parse_uri(text: str) -> dict[str, str]:
    """libpq's conninfo_uri_parse_options, step by step:
    `postgresql://[user[:password]@][host][:port][,...][/dbname][?param=value&...]`."""
    out: dict[str, str] = {}
    s = text.split("://", 1)[1]
    p = 0
    while p < len(s) and s[p] not in "@/":
        p += 1
    if p < len(s) and s[p] == "@":
        userinfo = s[:p]
        user, colon, password = userinfo.partition(":")
        if user:
            out["user"] = _uri_decode(user)
        if colon and password:
            out["password"] = _uri_decode(password)
        p += 1
    else:
        p = 0
    hosts: list[str] = []
    ports: list[str] = []
    end = ""  # the character that ended the last host or port
    while True:
        if p < len(s) and s[p] == "[":
            close = s.find("]", p)
            if close < 0:
                raise DsnError('no matching "]" for an IPv6 host address in the connection URI')
            if close == p + 1:
                raise DsnError("an IPv6 host address may not be empty in the connection URI")
            host = s[p + 1 : close]
            p = close + 1
            if p < len(s) and s[p] not in ":/?,":
                raise DsnError('unexpected character after "]" in the connection URI')
        else:
            start = p
            while p < len(s) and s[p] not in ":/?,":
                p += 1
            host = s[start:p]
        end = s[p] if p < len(s) else ""
        port = ""
        if end == ":":
            start = p = p + 1
            while p < len(s) and s[p] not in "/?,":
                p += 1
            port = s[start:p]
            end = s[p] if p < len(s) else ""
        hosts.append(host)
        ports.append(port)
        if end != ",":
            break
        p += 1
    if ",".join(hosts):
        out["host"] = _uri_decode(",".join(hosts))
    if ",".join(ports):
        out["port"] = _uri_decode(",".join(ports))
    p += 1  # past the '/' or '?' (or the end)
    if end == "/":
        start = p
        while p < len(s) and s[p] != "?":
            p += 1
        if p > start:
            out["dbname"] = _uri_decode(s[start:p])
        end = s[p] if p < len(s) else ""
        p += 1
    if end == "?":
        query = s[p:]
        while query:
            param, _, query = query.partition("&")
            keyword, eq, value = param.partition("=")
            if not eq:
                raise DsnError('missing key/value separator "=" in a connection URI parameter')
            if "=" in value:
                raise DsnError('extra key/value separator "=" in a connection URI parameter')
            keyword, value = _uri_decode(keyword), _uri_decode(value)
            if keyword == "ssl" and value == "true":  # libpq's JDBC compatibility
                keyword, value = "sslmode", "require"
            if keyword not in KEYWORDS and keyword != "requiressl":
                raise DsnError(f'invalid URI query parameter: "{keyword}"')
            _store(out, keyword, value, "connection URI")
    return out


def parse(dsn: str) -> dict[str, str]:
    """The keywords a connection string or URI sets explicitly (libpq's PQconninfoParse).
    Raises DsnError."""
    text = dsn.strip()
    return _parse_uri(text) if is_uri(text) else _parse_conninfo(text)


def without_password(dsn: str) -> str:
    """The connection string with its password removed (to print it back to a user)."""
    values = {k: v for k, v in parse(dsn).items() if k not in SECRET}
    return " ".join(f"{k}={quote(v)}" for k, v in values.items())


def quote(value: str) -> str:
    """A value as libpq reads it back in a key=value string. (A conninfo value, not an SQL
    identifier: those are shared.quoting.quote_ident's.)"""
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- resolving --------------------------------------------------------------------------


def default_socket_dir() -> str:
    """libpq's DEFAULT_PGSOCKET_DIR: /var/run/postgresql on Debian-like systems (where
    libpq is built that way), /tmp otherwise."""
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def _home(environ: Mapping[str, str]) -> str | None:
    """libpq's pqGetHomeDirectory: $HOME, else the user's home directory."""
    home = environ.get("HOME")
    if home:
        return home
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        return None


def _os_user() -> str:
    """libpq's pg_fe_getauthname: the effective user's name (not $USER)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError as exc:
        raise DsnError("could not look up the local user name; give user=") from exc


def _service(
    name: str, values: dict[str, str], origins: dict[str, str], environ: Mapping[str, str]
) -> None:
    """libpq's parseServiceInfo: PGSERVICEFILE or ~/.pg_service.conf, then
    $PGSYSCONFDIR/pg_service.conf; fills keywords not given yet."""
    files: list[Path] = []
    if environ.get("PGSERVICEFILE") is not None:
        files.append(Path(environ["PGSERVICEFILE"]))
    else:
        home = _home(environ)
        if home and (Path(home) / ".pg_service.conf").exists():
            files.append(Path(home) / ".pg_service.conf")
    sysconf = Path(environ.get("PGSYSCONFDIR") or "/etc/postgresql-common") / "pg_service.conf"
    if sysconf.exists():
        files.append(sysconf)
    for path in files:
        if _service_file(path, name, values, origins):
            return
    raise DsnError(f'definition of service "{name}" not found')


def _service_file(path: Path, name: str, values: dict[str, str], origins: dict[str, str]) -> bool:
    try:
        # bytes, as libpq reads it: a comment in another encoding is no error
        data = user_files.read_bytes(path, "service file")
    except user_files.UnreadableFile as exc:
        raise DsnError(str(exc)) from exc
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    found = False
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if found:
                return True
            found = line[1:].startswith(name) and line[1 + len(name) : 2 + len(name)] == "]"
            continue
        if not found:
            continue
        if line.startswith("ldap"):
            raise DsnError(f'service file "{path}", line {number}: LDAP lookups are not supported')
        keyword, eq, value = line.partition("=")
        if not eq or keyword not in KEYWORDS:
            raise DsnError(f'syntax error in service file "{path}", line {number}')
        if keyword == "service":
            raise DsnError(
                f'nested service specifications not supported in service file "{path}", '
                f"line {number}"
            )
        if keyword not in values:
            values[keyword] = value
            origins[keyword] = f"service {name}"
    return found


@dataclass(frozen=True)
class Params:
    """Resolved connection parameters: every keyword with a value, from wherever it came.
    The password (given, from a service file or PGPASSWORD) is kept apart and out of the
    repr; the password file is read at each connection."""

    values: Mapping[str, str]
    origins: Mapping[str, str]  # keyword -> "connection string", "PGHOST", an option...
    password: str | None = field(default=None, repr=False)
    home: str | None = None

    def __repr__(self) -> str:
        shown = {k: ("***" if k in SECRET else v) for k, v in self.values.items()}
        return f"Params(values={shown}, origins={dict(self.origins)}, home={self.home!r})"

    def get(self, keyword: str) -> str:
        return self.values.get(keyword, "")

    def where(self, keyword: str) -> str:
        return self.origins.get(keyword, "default")

    @property
    def hosts(self) -> list[str]:
        """One entry per host to try; an empty one is the default socket (as libpq)."""
        given = self.get("host").split(",") if self.get("host") else [""]
        return [h or default_socket_dir() for h in given]

    @property
    def port_texts(self) -> list[str]:
        """One port per host, as written (the password file compares the text)."""
        hosts = self.hosts
        texts = self.get("port").split(",") if self.get("port") else ["5432"]
        if len(texts) == 1:
            texts = texts * len(hosts)
        if len(texts) != len(hosts):
            raise DsnError(f"could not match {len(texts)} port numbers to {len(hosts)} hosts")
        return [t or "5432" for t in texts]

    @property
    def ports(self) -> list[int]:
        ports = []
        for t in self.port_texts:
            t = t.strip()
            if not t.isdigit() or not 0 < int(t) < 65536:
                raise DsnError(f"invalid port number (port, from {self.where('port')})")
            ports.append(int(t))
        return ports

    @property
    def user(self) -> str:
        return self.get("user") or _os_user()

    @property
    def dbname(self) -> str:
        return self.get("dbname") or self.user

    @property
    def passfile(self) -> str | None:
        if self.get("passfile"):
            return self.get("passfile")
        return os.path.join(self.home, ".pgpass") if self.home else None

    def replace(self, **values: str) -> Params:
        """These keywords set (an empty value: unset), as the command itself decides them
        (the catalog reader's database, say)."""
        new = dict(self.values)
        origins = dict(self.origins)
        for k, v in values.items():
            if k not in KEYWORDS or k in SECRET:
                raise DsnError(f'invalid connection option "{k}"')
            if v:
                new[k], origins[k] = v, "pgveil"
            else:
                new.pop(k, None)
                origins.pop(k, None)
        return Params(new, origins, self.password, self.home)

    def describe(self, host: str | None = None, port: int | None = None) -> str:
        host = host if host is not None else self.hosts[0]
        port = port if port is not None else self.ports[0]
        where = f'socket "{host}/.s.PGSQL.{port}"' if _is_socket(host) else f"{host}:{port}"
        return f"{where} database {self.dbname} as {self.user}"


def _is_socket(host: str) -> bool:
    return host.startswith("/")


def resolve(
    dsn: str | None = "",
    options: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Params:
    """The parameters libpq would connect with: the connection string's keywords, then
    `options` (the command's own flags; None or "" means not given; `labels` names them in
    messages), then the service file, then the environment, then the defaults. Raises
    DsnError for what libpq rejects and what asyncpg cannot do."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    origins: dict[str, str] = {}
    for k, v in parse(dsn or "").items():
        values[k], origins[k] = v, "connection string"
    for k, opt in (options or {}).items():
        if k not in KEYWORDS:
            raise DsnError(f'invalid connection option "{k}"')
        if opt and k not in values:
            values[k], origins[k] = opt, (labels or {}).get(k, k)
    service = values.get("service") or environ.get("PGSERVICE")
    if service:
        _service(service, values, origins, environ)
    for k, env in KEYWORDS.items():
        if k not in values and env is not None and env in environ:
            values[k], origins[k] = environ[env], env
    if "sslmode" not in values and environ.get("PGREQUIRESSL", "").startswith("1"):
        values["sslmode"], origins["sslmode"] = "require", "PGREQUIRESSL"
    for k, default in _DEFAULTS.items():
        if not values.get(k):
            values[k] = default
            origins.pop(k, None)
    password = values.pop("password", None) or None
    params = Params(
        {k: v for k, v in values.items() if v != ""},
        {k: v for k, v in origins.items() if values.get(k, "") != ""},
        password,
        _home(environ),
    )
    _check(params)
    return params


def _check(params: Params) -> None:
    for keyword, allowed in _CHOICES.items():
        value = params.get(keyword)
        if value and value not in allowed:
            raise DsnError(
                f'invalid {keyword} value: "{value}" (from {params.where(keyword)}); '
                "expected one of " + ", ".join(allowed)
            )
    for keyword, (ok, why) in _LIMITS.items():
        value = params.get(keyword)
        refused = value == "system" if keyword == "sslrootcert" else value.lower() not in ok
        if refused:
            why = why or "give the CA file"
            raise DsnError(
                f"{keyword} (from {params.where(keyword)}) is not supported by pgveil's "
                f"client: {why}"
            )
    if params.get("client_encoding").lower() not in _UTF8:
        raise DsnError(
            f"client_encoding (from {params.where('client_encoding')}): pgveil's client "
            "speaks UTF8 only"
        )
    if any(h.startswith("@") for h in params.hosts):
        raise DsnError("abstract Unix sockets (host=@...) are not supported by pgveil's client")
    for host in params.hosts:
        if not _is_socket(host):
            try:
                # what the resolver does first; it fails on an empty part or one longer
                # than 63 characters (a UnicodeError deep inside each connection attempt)
                host.encode("idna")
            except UnicodeError:
                raise DsnError(
                    f'invalid host name "{host}" (from {params.where("host")}): a part between '
                    "dots is empty or longer than 63 characters"
                ) from None
    if params.get("connect_timeout"):
        _timeout(params)
    params.ports  # noqa: B018 - validates the port list against the hosts


def _timeout(params: Params) -> float | None:
    """libpq's connect_timeout: whole seconds per host, at least 2; 0 or less: none."""
    text = params.get("connect_timeout").strip()
    try:
        seconds = int(text)
    except ValueError as exc:
        raise DsnError(
            f"invalid integer value for connect_timeout (from {params.where('connect_timeout')})"
        ) from exc
    if seconds <= 0:
        return None
    return float(max(seconds, 2))


# -- the password file ------------------------------------------------------------------


def _matches(field_text: str, token: str) -> str | None:
    """libpq's pwdfMatchesString: the rest of the line after a field that is `*` or equals
    `token` (backslash escapes the next character), else None."""
    if field_text.startswith("*:"):
        return field_text[2:]
    i, t = 0, 0
    while i < len(field_text):
        escaped = False
        if field_text[i] == "\\":
            i += 1
            escaped = True
            if i >= len(field_text):
                return None
        if field_text[i] == ":" and t == len(token) and not escaped:
            return field_text[i + 1 :]
        if t == len(token) or field_text[i] != token[t]:
            return None
        i += 1
        t += 1
    return None


def password_from_file(
    path: str, host: str, port: str, dbname: str, user: str, warn: Any = None
) -> str | None:
    """libpq's passwordFromFile: the first line of the password file whose host, port,
    database and user fields match. A missing file is no password; a file that is not a
    regular file, or that group or others may access, is ignored with a warning on
    standard error (as libpq prints it)."""
    warn = warn or (lambda text: sys.stderr.write(f"WARNING: {text}\n"))
    if not dbname or not user:
        return None
    if not host or (_is_socket(host) and host == default_socket_dir()):
        host = "localhost"
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        warn(f'password file "{path}" is not a plain file')
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(
            f'password file "{path}" has group or world access; permissions should be '
            "u=rw (0600) or less"
        )
        return None
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    for line in lines:
        if line.startswith("#"):
            continue
        line = line.rstrip("\r\n")
        if not line:
            continue
        rest: str | None = line
        for token in (host, port, dbname, user):
            rest = _matches(rest, token) if rest is not None else None
        if rest is None:
            continue
        out: list[str] = []
        i = 0
        while i < len(rest) and rest[i] != ":":
            if rest[i] == "\\" and i + 1 < len(rest):
                i += 1
            out.append(rest[i])
            i += 1
        return "".join(out)
    return None


# -- connecting -------------------------------------------------------------------------


async def connect(
    target: str | Params,
    *,
    dbname: str | None = None,
    fallback_application_name: str | None = None,
    server_settings: Mapping[str, str] | None = None,
    timeout: float | None = 60.0,
    **kwargs: Any,
) -> Any:
    """An asyncpg connection, as libpq would open it: to each host in turn until one
    accepts (an authentication failure stops there, as in libpq), with the password given,
    else the password file's for that host. `dbname` replaces the database (a command that
    reads several); `server_settings` are the command's own session settings (they win
    over `options`); `timeout` applies per host unless the connection says
    connect_timeout. Raises DsnError or ConnectError."""
    params = resolve(target) if isinstance(target, str) else target
    if dbname is not None:
        params = params.replace(dbname=dbname)
    settings: dict[str, str] = {}
    if params.get("options"):
        settings["options"] = params.get("options")
    app = (
        params.get("application_name")
        or params.get("fallback_application_name")
        or fallback_application_name
    )
    if app:
        settings["application_name"] = app
    settings.update(server_settings or {})
    if params.get("connect_timeout"):
        timeout = _timeout(params)
    ssl_uri = _ssl_uri(params)
    hosts = list(zip(params.hosts, params.ports, params.port_texts, strict=True))
    if params.get("load_balance_hosts") == "random":
        random.shuffle(hosts)
    attrs = params.get("target_session_attrs")
    passes = ["standby", "any"] if attrs == "prefer-standby" else [attrs]
    last: BaseException | None = None
    for attempt in passes:
        for host, port, port_text in hosts:
            password = params.password
            from_file = False
            if password is None and params.passfile:
                password = password_from_file(
                    params.passfile, host, port_text, params.dbname, params.user
                )
                from_file = password is not None
            socket = _is_socket(host)  # libpq never asks for TLS over a Unix socket
            try:
                return await asyncpg.connect(
                    "postgresql://" if socket else ssl_uri,
                    host=host,
                    port=port,
                    user=params.user,
                    password=password or "",  # never asyncpg's own PGPASSWORD/.pgpass
                    database=params.dbname,
                    ssl=False if socket else _ssl(params),
                    direct_tls=not socket and params.get("sslnegotiation") == "direct",
                    target_session_attrs=attempt,
                    krbsrvname=params.get("krbsrvname") or None,
                    gsslib=params.get("gsslib") or None,
                    server_settings=settings,
                    timeout=timeout,
                    **kwargs,
                )
            except (OSError, TimeoutError) as exc:
                last = exc  # unreachable: the next host
            except asyncpg.exceptions.TargetServerAttributeNotMatched as exc:
                last = exc
            except asyncpg.CannotConnectNowError as exc:
                last = exc  # starting up or shutting down: the next host
            except asyncpg.PostgresError as exc:
                raise ConnectError(_refused(params, host, port, exc, password, from_file)) from exc
            except asyncpg.InterfaceError as exc:
                raise ConnectError(
                    f"cannot connect to {params.describe(host, port)}: {exc}"
                ) from exc
    raise ConnectError(_unreachable(params, [(h, p) for h, p, _ in hosts], last)) from last


def _ssl(params: Params) -> str | bool:
    mode = params.get("sslmode")
    return False if mode == "disable" else mode


def _ssl_uri(params: Params) -> str:
    """The TLS files as a URI for asyncpg (it takes them no other way); only those set."""
    keys = (
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
    )
    query = {k: params.get(k) for k in keys if params.get(k)}
    return "postgresql://" + ("?" + urlencode(query) if query else "")


def _refused(
    params: Params,
    host: str,
    port: int,
    exc: BaseException,
    password: str | None,
    from_file: bool,
) -> str:
    code = getattr(exc, "sqlstate", None) or ""
    # a server's message before the session starts names roles, databases and addresses,
    # never row values (no statement has run)
    reason = str(getattr(exc, "message", None) or exc).strip() or type(exc).__name__
    text = f"cannot connect to {params.describe(host, port)}: {reason}"
    if code:
        text += f" ({code})"
    for label in ("detail", "hint"):
        extra = getattr(exc, label, None)
        if extra:
            text += f"; {label.upper()}: {' '.join(str(extra).split())}"
    if code == "28P01":
        if from_file:
            text += f'; the password came from the password file "{params.passfile}"'
        elif not password:
            where = f'"{params.passfile}"' if params.passfile else "(none)"
            text += (
                "; no password was given: none in the connection string, a service file or "
                f"PGPASSWORD, and no matching line in the password file {where}"
            )
    return text


def _unreachable(params: Params, hosts: list[tuple[str, int]], last: BaseException | None) -> str:
    where = ", ".join(
        f'socket "{h}/.s.PGSQL.{p}"' if _is_socket(h) else f"{h}:{p}" for h, p in hosts
    )
    if isinstance(last, asyncpg.exceptions.TargetServerAttributeNotMatched):
        why = f"no server matches target_session_attrs={params.get('target_session_attrs')}"
    elif isinstance(last, asyncpg.CannotConnectNowError):
        why = "the server is starting up or shutting down"
    elif isinstance(last, TimeoutError):
        why = "timed out"
    elif isinstance(last, OSError):
        # asyncio's text ("Connect call failed ('127.0.0.1', 5432)") repeats the address;
        # the errno says what happened
        why = (
            os.strerror(last.errno)
            if last.errno
            else (last.strerror or str(last) or type(last).__name__)
        )
    else:
        why = type(last).__name__ if last is not None else "no host to try"
    return (
        f"cannot reach the database at {where} (database {params.dbname} as {params.user}): {why}"
    )
