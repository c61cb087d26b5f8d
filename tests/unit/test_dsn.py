"""shared.dsn reads connection strings, the environment and the password file as libpq does.

The parser is compared with libpq's own (PQconninfoParse, through psycopg); precedence,
the service file and the password file are compared with what libpq's code says (the
integration test tests/integration/test_dsn.py compares real connections with psql's).
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from proxy.config import ConfigError, load_config
from shared import dsn
from shared.address import HostPort

CONNINFOS = [
    "host=a port=5 dbname=x user=u password=p",
    "host = a  port= 5",
    "password='it\\'s a \\\\ secret' host=h",
    "password=a\\ b host=h",
    "dbname='' host=h",
    "host=",
    "requiressl=0",
    "requiressl=1 host=h",
    "  ",
    "postgresql://",
    "postgres://h",
    "postgresql://u:p@h:5/db?sslmode=require&application_name=x",
    "postgresql://u@h1:1,h2:2,h3/db",
    "postgresql://[::1]:5432/db",
    "postgresql://[::1],h2/db",
    "postgresql://h/d%20b?options=-c%20search_path%3Dx",
    "postgres://h?ssl=true",
    "postgresql://h?requiressl=1",
    "postgresql://%2Fvar%2Frun%2Fpostgresql/db",
    "postgresql:///db?host=/tmp&port=5433",
    "postgresql://u:@h",
    "postgresql://:p@h",
    "postgresql://u:p%40ss%3Aw@h/db",
    "postgresql://h?",
    "postgresql://h/",
    "postgresql://h,",
    "postgresql://h:5,",
    "postgresql://h?dbname=x&dbname=y",
    "postgresql://h:5/?port=6",
    "postgresql://host?user=a@b",
    # what libpq rejects
    "nonsense",
    "host=a b",
    "host='unterminated",
    "bogus=1",
    "postgresql://h?bogus=1",
    "postgresql://h?a",
    "postgresql://h?a=b=c",
    "postgresql://h?a=1&",
    "postgresql://h?&",
    "postgresql://h/%zz",
    "postgresql://h/%00",
    "postgresql://[::1",
    "postgresql://[]/db",
    "postgresql://[::1]x/db",
]


@pytest.mark.parametrize("text", CONNINFOS)
def test_parse_agrees_with_libpq(text: str) -> None:
    try:
        want: dict[str, str] | str = {k: str(v) for k, v in conninfo_to_dict(text).items()}
    except psycopg.ProgrammingError:
        want = "error"
    try:
        got: dict[str, str] | str = dsn.parse(text)
    except dsn.DsnError:
        got = "error"
    assert got == want


@pytest.mark.parametrize(
    "text",
    [
        "password=s3cr3t-pw oops",
        "host=h password='s3cr3t-pw",
        "postgresql://u:s3cr3t-pw@h?bogus=1",
        "postgresql://u:s3cr3t-pw@h/%zz",
        "postgresql://u:s3cr3t-pw@h:port",
        "host=h password=s3cr3t-pw port=notaport",
        "host=h password=s3cr3t-pw sslmode=verify-ful",
        "host=h password=s3cr3t-pw hostaddr=1.2.3.4",
    ],
)
def test_errors_never_show_the_password(text: str) -> None:
    with pytest.raises(dsn.DsnError) as info:
        dsn.resolve(text, environ={})
    assert "s3cr3t" not in str(info.value)


def test_params_repr_has_no_password() -> None:
    params = dsn.resolve("host=h password=s3cr3t-pw sslpassword=k3y-pw", environ={})
    assert params.password == "s3cr3t-pw"
    assert "s3cr3t" not in repr(params) and "k3y" not in repr(params)


def test_precedence_dsn_options_service_environment_defaults(tmp_path: Path) -> None:
    service = tmp_path / "services.conf"
    service.write_text(
        "# comment\n[billing]\nhost=svc-host\nport=6000\ndbname=svc-db\nuser=svc-user\n"
        "application_name=svc-app\n[other]\nhost=nope\n"
    )
    env = {
        "PGSERVICEFILE": str(service),
        "PGSERVICE": "billing",
        "PGHOST": "env-host",
        "PGUSER": "env-user",
        "PGDATABASE": "env-db",
        "PGPORT": "7000",
        "PGAPPNAME": "env-app",
        "PGSSLMODE": "require",
        "PGOPTIONS": "-c search_path=x",
        "HOME": str(tmp_path),
    }
    p = dsn.resolve("dbname=dsn-db", {"user": "opt-user", "dbname": "opt-db"}, env)
    assert p.dbname == "dsn-db"  # the connection string beats the options
    assert p.user == "opt-user"  # the options beat the service file and the environment
    assert (p.hosts, p.ports) == (["svc-host"], [6000])  # the service beats the environment
    assert p.get("application_name") == "svc-app"
    assert p.get("sslmode") == "require"  # the environment beats the defaults
    assert p.get("options") == "-c search_path=x"
    assert p.where("user") == "user" and p.where("host") == "service billing"
    assert p.where("sslmode") == "PGSSLMODE"
    # defaults: libpq's
    bare = dsn.resolve("", environ={"HOME": str(tmp_path)})
    assert bare.hosts == [dsn.default_socket_dir()] and bare.ports == [5432]
    assert bare.get("sslmode") == "prefer" and bare.dbname == bare.user
    assert bare.passfile == str(tmp_path / ".pgpass")


def test_service_errors(tmp_path: Path) -> None:
    service = tmp_path / "s.conf"
    service.write_text("[a]\nhost=h\n")
    env = {"PGSERVICEFILE": str(service), "PGSYSCONFDIR": str(tmp_path / "none")}
    with pytest.raises(dsn.DsnError, match='definition of service "b" not found'):
        dsn.resolve("service=b", environ=env)
    service.write_text("[a]\nhost = h\n")  # libpq takes the key before '=' as it is
    with pytest.raises(dsn.DsnError, match="syntax error in service file"):
        dsn.resolve("service=a", environ=env)
    service.write_text("[a]\nservice=b\n")
    with pytest.raises(dsn.DsnError, match="nested service"):
        dsn.resolve("service=a", environ=env)


def test_requiressl_and_empty_values() -> None:
    assert dsn.resolve("", environ={"PGREQUIRESSL": "1"}).get("sslmode") == "require"
    assert dsn.resolve("", environ={"PGREQUIRESSL": "1", "PGSSLMODE": "disable"}).get(
        "sslmode"
    ) == ("disable")
    # an empty value given explicitly hides the environment, then means the default
    assert dsn.resolve("host=''", environ={"PGHOST": "env"}).hosts == [dsn.default_socket_dir()]
    # an empty password: the password file is read
    assert dsn.resolve("", environ={"PGPASSWORD": ""}).password is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hostaddr=127.0.0.1", "hostaddr"),
        ("channel_binding=require", "channel binding"),
        ("require_auth=scram-sha-256", "require_auth"),
        ("requirepeer=postgres", "requirepeer"),
        ("gssencmode=require", "GSSAPI"),
        ("sslcertmode=require", "sslcertmode"),
        ("sslcrldir=/etc/crl", "sslcrldir"),
        ("sslsni=0", "sslsni"),
        ("sslrootcert=system", "sslrootcert"),
        ("replication=database", "replication"),
        ("client_encoding=LATIN1", "UTF8"),
        ("sslmode=verfy-full", 'invalid sslmode value: "verfy-full"'),
        ("target_session_attrs=any-of-them", "invalid target_session_attrs"),
        ("host=a,b port=1,2,3", "could not match 3 port numbers to 2 hosts"),
        ("port=0", "invalid port number"),
        ("connect_timeout=soon", "connect_timeout"),
        ("host=@abstract", "abstract"),
    ],
)
def test_what_asyncpg_cannot_do_is_refused(text: str, message: str) -> None:
    with pytest.raises(dsn.DsnError, match=message):
        dsn.resolve(text, environ={})


def test_refused_from_the_environment_names_the_variable() -> None:
    with pytest.raises(dsn.DsnError, match=r"hostaddr \(from PGHOSTADDR\)"):
        dsn.resolve("", environ={"PGHOSTADDR": "127.0.0.1"})


def _pgpass(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "pgpass"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_password_file_matches_as_libpq(tmp_path: Path) -> None:
    path = _pgpass(
        tmp_path,
        "# comment line\n"
        "db.example:5432:billing:eraser:first\r\n"
        "db\\:x:5432:*:eraser:escaped-host\n"
        "*:5433:*:*:pa\\:ss\\\\word:ignored-rest\n"
        "localhost:5432:*:local:from-socket\n"
        "*:*:*:*:fallback\n",
    )
    get = dsn.password_from_file
    assert get(path, "db.example", "5432", "billing", "eraser") == "first"
    assert get(path, "db:x", "5432", "other", "eraser") == "escaped-host"
    assert get(path, "any", "5433", "d", "u") == "pa:ss\\word"  # de-escaped, ends at ':'
    assert get(path, dsn.default_socket_dir(), "5432", "d", "local") == "from-socket"
    assert get(path, "", "5432", "d", "local") == "from-socket"  # no host: localhost
    # a socket in another directory is matched by its path, not as localhost
    assert get(path, "/tmp/elsewhere", "5432", "d", "local") == "fallback"
    assert get(path, "db.example", "05432", "billing", "eraser") == "fallback"  # text, as libpq
    assert get(path, "h", "1", "", "u") is None  # no database: no lookup


def test_password_file_permissions(tmp_path: Path) -> None:
    warnings: list[str] = []
    path = _pgpass(tmp_path, "*:*:*:*:pw\n", 0o640)
    assert dsn.password_from_file(path, "h", "1", "d", "u", warnings.append) is None
    assert warnings == [
        f'password file "{path}" has group or world access; permissions should be u=rw '
        "(0600) or less"
    ]
    warnings.clear()
    assert dsn.password_from_file(str(tmp_path), "h", "1", "d", "u", warnings.append) is None
    assert warnings == [f'password file "{tmp_path}" is not a plain file']
    assert dsn.password_from_file(str(tmp_path / "none"), "h", "1", "d", "u") is None


def test_without_password() -> None:
    assert dsn.without_password("host=h password=pw user='a b'") == "host=h user='a b'"
    assert dsn.without_password("postgresql://u:pw@h/db") == "user=u host=h dbname=db"
    assert dsn.parse(dsn.without_password("password=x application_name='it\\'s'")) == {
        "application_name": "it's"
    }


# -- the proxy's connection settings --------------------------------------------------------


def test_proxy_upstream_from_the_environment(tmp_path: Path) -> None:
    env = {"PGHOST": "db.internal", "PGPORT": "6543", "PGUSER": "pgveil", "HOME": str(tmp_path)}
    cfg = load_config({}, env)
    assert cfg.upstream == HostPort("db.internal", 6543)
    assert cfg.catalog_user == "pgveil" and cfg.catalog_password is None
    assert cfg.upstream_sslmode == "prefer"
    # nothing anywhere: pgveil's default, TCP on the local host
    assert load_config({}, {"HOME": str(tmp_path)}).upstream == HostPort("127.0.0.1", 5432)


def test_proxy_upstream_precedence(tmp_path: Path) -> None:
    env = {
        "PGHOST": "env-host",
        "PGUSER": "env-user",
        "PGPASSWORD": "env-pw",
        "PGSSLMODE": "disable",
        "HOME": str(tmp_path),
    }
    flags = {"catalog_user": "flag-user", "upstream_sslmode": "require"}
    cfg = load_config({**flags, "upstream": "h1:5433"}, env)
    assert cfg.upstream == HostPort("h1", 5433)
    assert (cfg.catalog_user, cfg.catalog_password, cfg.upstream_sslmode) == (
        "flag-user",
        "env-pw",
        "require",
    )
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    text = f"host=dsn-host port=5434 user=dsn-user sslmode=verify-full sslrootcert={ca}"
    cfg = load_config({**flags, "upstream": text}, env)
    assert cfg.upstream == HostPort("dsn-host", 5434)
    assert cfg.catalog_user == "dsn-user" and cfg.upstream_sslmode == "verify-full"
    assert cfg.upstream_sslrootcert == ca
    assert cfg.server is not None and cfg.server.get("sslrootcert") == str(ca)
    uri = "postgresql://dsn-user:dsn-pw@[::1]:5435/?application_name=x"
    cfg = load_config({"upstream": uri}, env)
    assert cfg.upstream == HostPort("::1", 5435) and cfg.catalog_password == "dsn-pw"
    assert "dsn-pw" not in repr(cfg) and "env-pw" not in repr(cfg)


def test_proxy_require_with_a_root_certificate_verifies(tmp_path: Path) -> None:
    (tmp_path / ".postgresql").mkdir()
    (tmp_path / ".postgresql" / "root.crt").write_text("not read here")
    cfg = load_config({"upstream_sslmode": "require"}, {"HOME": str(tmp_path)})
    assert cfg.upstream_sslmode == "verify-ca"
    assert cfg.upstream_sslrootcert == tmp_path / ".postgresql" / "root.crt"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"upstream": "host=h dbname=x"}, "dbname: pgveil reads every database"),
        ({"upstream": "host=a,b"}, "one host"),
        ({"upstream": "host=h bogus=1"}, 'invalid connection option "bogus"'),
        ({"upstream": "postgresql://h?sslmode=sometimes"}, "invalid sslmode value"),
        ({"audit_table_dsn": "host=h hostaddr=1.2.3.4"}, "hostaddr"),
        ({"rules": __file__}, "needs --catalog-user (or user= in --upstream, or PGUSER)"),
        ({"upstream_sslmode": "verify-full"}, "needs a root certificate"),
    ],
)
def test_proxy_connection_errors(flags: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags, {"HOME": str(tmp_path)})
    assert message in str(info.value)
