"""A file or connection string a user gives that pgveil cannot read is one line
`pgveil: error: ...` that names the file or setting and the problem, exit status 2, never a
traceback: a file that is not UTF-8 (a Latin-1 umlaut in a comment), a directory, a file
pgveil may not read, a malformed connection URI. For every command that takes one, as a
user runs it: `pgveil` in a subprocess.

The tests run as root, which reads any file whatever its mode: the command that must not
read the file runs without the capabilities that let it (setpriv), as any other user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.demo.embedded_pg import free_port
from tests.integration.erasure_fixture import config_yaml

ROOT = Path(__file__).resolve().parents[2]
LATIN1 = b"# Gr\xfc\xdfe aus M\xfcnchen\n"  # a comment in Latin-1: not UTF-8
DAC = "-dac_override,-dac_read_search"  # the capabilities that let root read any file
# malformed connection URIs: each is refused before any connection is tried
BAD_URIS = {
    "port": "postgresql://db.invalid:5432x/billing",
    "ipv6": "postgresql://[::1/billing",
    "percent": "postgresql://db.invalid/bill%zzing",
    "host": "postgresql://db..invalid/billing",  # an empty label: a traceback before
}


def _unprivileged() -> list[str]:
    """The prefix that runs a command unable to read a file its mode forbids."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root's file access"
    return [setpriv, f"--inh-caps={DAC}", f"--bounding-set={DAC}"]


def pgveil(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = _unprivileged() if unprivileged else []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGVEIL_"))}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "proxy.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip


def one_error_line(r: subprocess.CompletedProcess[str], *names: str, code: int = 2) -> str:
    """The single `pgveil: error:` line of a failed command, which names each of `names`
    (the proxy's log lines before it, JSON objects, are not part of the error)."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if not x.startswith('{"ts":')]
    assert len(lines) == 1 and lines[0].startswith("pgveil: error: "), r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---- the files -------------------------------------------------------------------------------


def bad_file(tmp: Path, kind: str, valid: bytes = b"") -> Path:
    """A file of the kind: `latin1` (valid content after a Latin-1 comment), `directory`,
    `unreadable` (valid content, mode 000)."""
    path = tmp / f"{kind}-file"
    if kind == "directory":
        path.mkdir()
    elif kind == "latin1":
        path.write_bytes(LATIN1 + valid)
    else:
        path.write_bytes(valid)
        path.chmod(0)
    return path


PROBLEMS = {
    "latin1": "not UTF-8 text (line 1, byte 5 of the line)",
    "directory": "is a directory",
    "unreadable": "permission denied",
}


def _proxy(*args: str) -> list[str]:
    return ["proxy", "--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:1", *args]


def _rules(tmp: Path, key: Path) -> Path:
    rules = tmp / "rules.yaml"
    rules.write_text(
        f"keys:\n  hash: {{file: {key}}}\ntables:\n  public.t:\n    columns:\n      c: hash\n"
    )
    return rules


def _audit_file(tmp: Path) -> Path:
    """An audit file (empty: the key or anchor is read before it)."""
    audit = tmp / "audit.jsonl"
    audit.touch()
    return audit


# each command that reads a file a user names: how it is given the file
FILE_COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "proxy --config": lambda f, tmp: _proxy("--config", str(f)),
    "proxy --rules": lambda f, tmp: _proxy("--rules", str(f), "--catalog-user", "pgveil"),
    "proxy --tls-cert": lambda f, tmp: _proxy("--tls-cert", str(f), "--tls-key", str(f)),
    "proxy --upstream-sslrootcert": lambda f, tmp: _proxy(
        "--upstream-sslmode", "verify-full", "--upstream-sslrootcert", str(f)
    ),
    "rules check --rules": lambda f, tmp: ["rules", "check", "--rules", str(f)],
    "erase run --config": lambda f, tmp: ["erase", "run", "--once", "--config", str(f)],
    "erase status --config": lambda f, tmp: ["erase", "status", "--config", str(f)],
    "erase subject --config": lambda f, tmp: ["erase", "subject", "1", "--config", str(f)],
}
# files read as bytes (keys, audit streams): a directory and an unreadable file only
BYTE_COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "proxy --rules key file": lambda f, tmp: _proxy(
        "--rules", str(_rules(tmp, f)), "--catalog-user", "pgveil"
    ),
    "rules check key file": lambda f, tmp: ["rules", "check", "--rules", str(_rules(tmp, f))],
    "proxy --audit-key": lambda f, tmp: _proxy(
        "--audit-file", str(tmp / "a.jsonl"), "--audit-key", f"file:{f}"
    ),
    "proxy --audit-file": lambda f, tmp: _proxy("--audit-file", str(f)),
    "proxy --audit-anchor-file": lambda f, tmp: _proxy(
        "--audit-file", str(tmp / "a.jsonl"), "--audit-anchor-file", str(f)
    ),
    "audit verify FILE": lambda f, tmp: ["audit", "verify", str(f)],
    "audit verify --key": lambda f, tmp: [
        "audit",
        "verify",
        str(_audit_file(tmp)),
        "--key",
        f"file:{f}",
    ],
    "audit verify --anchor": lambda f, tmp: [
        "audit",
        "verify",
        str(_audit_file(tmp)),
        "--anchor",
        str(f),
    ],
    "audit who --file": lambda f, tmp: [
        "audit",
        "who",
        "--table",
        "billing.customers",
        "--subject",
        "1",
        "--file",
        str(f),
    ],
    "audit tail": lambda f, tmp: ["audit", "tail", str(f)],
}


def _valid(command: str, tmp: Path) -> bytes:
    """What the file holds besides the Latin-1 comment: valid for the command."""
    if command.startswith("erase"):
        return config_yaml(tmp / "erasure-audit.jsonl").encode()
    if command.startswith("rules") or command == "proxy --rules":
        return _rules(tmp, tmp / "key").read_bytes()
    if command == "proxy --config":
        return b"listen: 127.0.0.1:1\n"
    return b""


@pytest.mark.parametrize("kind", sorted(PROBLEMS))
@pytest.mark.parametrize("command", sorted(FILE_COMMANDS))
def test_a_file_that_cannot_be_read_is_one_line(tmp_path: Path, command: str, kind: str) -> None:
    (tmp_path / "key").write_bytes(b"k" * 32)
    path = bad_file(tmp_path, kind, _valid(command, tmp_path))
    r = pgveil(*FILE_COMMANDS[command](path, tmp_path), unprivileged=kind == "unreadable")
    if command == "proxy --tls-cert" and kind == "latin1":
        # not a certificate at all: the ssl module's reason
        one_error_line(r, "--tls-cert", "cannot load certificate")
    elif command == "proxy --upstream-sslrootcert" and kind == "latin1":
        one_error_line(r, "--upstream-sslrootcert", str(path), "cannot load certificates")
    else:
        one_error_line(r, str(path), PROBLEMS[kind])


@pytest.mark.parametrize("kind", ["directory", "unreadable"])
@pytest.mark.parametrize("command", sorted(BYTE_COMMANDS))
def test_a_key_or_audit_file_that_cannot_be_read_is_one_line(
    tmp_path: Path, command: str, kind: str
) -> None:
    path = bad_file(tmp_path, kind)
    r = pgveil(*BYTE_COMMANDS[command](path, tmp_path), unprivileged=kind == "unreadable")
    one_error_line(r, str(path), PROBLEMS[kind])


def test_an_audit_file_that_is_not_utf8_is_a_finding_or_one_line(tmp_path: Path) -> None:
    """An audit file is JSON lines written by pgveil: a line in another encoding is not an
    event. `verify` reports it (the chain is broken, exit 1); `who` and `tail` stop on it
    with one line that names the file and the line (exit 1, as for any line that is not an
    event)."""
    audit = tmp_path / "audit.jsonl"
    audit.write_bytes(LATIN1)
    r = pgveil("audit", "verify", str(audit))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"{audit} line 1" in r.stdout, r.stdout
    for args in (
        ["audit", "who", "--table", "billing.customers", "--subject", "1", "--file", str(audit)],
        ["audit", "tail", str(audit)],
    ):
        one_error_line(pgveil(*args), f"{audit}:1", code=1)


# ---- connection strings ----------------------------------------------------------------------

DSN_COMMANDS: dict[str, Callable[[str, Path], list[str]]] = {
    "proxy --upstream": lambda d, tmp: ["proxy", "--listen", f"127.0.0.1:{free_port()}",
                                        "--upstream", d],
    "proxy --audit-table-dsn": lambda d, tmp: _proxy("--audit-table-dsn", d),
    "rules check --dsn": lambda d, tmp: [
        "rules", "check", "--rules", str(_rules(tmp, tmp / "key")), "--dsn", d
    ],
    "rules suggest --dsn": lambda d, tmp: ["rules", "suggest", "--dsn", d],
    "audit verify --dsn": lambda d, tmp: ["audit", "verify", "--dsn", d],
    "audit who --dsn": lambda d, tmp: [
        "audit", "who", "--table", "billing.customers", "--subject", "1", "--dsn", d
    ],
    "erase run --dsn": lambda d, tmp: ["erase", "run", "--once", "--config", str(_erasure(tmp)),
                                       "--dsn", d],
    "erase status --dsn": lambda d, tmp: ["erase", "status", "--config", str(_erasure(tmp)),
                                          "--dsn", d],
    "demo --dsn": lambda d, tmp: ["demo", "--dsn", d],
}  # fmt: skip


def _erasure(tmp: Path) -> Path:
    path = tmp / "erasure.yaml"
    path.write_text(config_yaml(tmp / "erasure-audit.jsonl"))
    return path


@pytest.mark.parametrize("uri", sorted(BAD_URIS))
@pytest.mark.parametrize("command", sorted(DSN_COMMANDS))
def test_a_malformed_connection_uri_is_one_line(tmp_path: Path, command: str, uri: str) -> None:
    (tmp_path / "key").write_bytes(b"k" * 32)
    flag = command.split()[-1]
    r = pgveil(*DSN_COMMANDS[command](BAD_URIS[uri], tmp_path))
    line = one_error_line(r, flag)
    assert "cannot reach" not in line and "cannot connect" not in line, line  # (never tried)
