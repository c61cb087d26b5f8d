"""Startup parameters read as the server reads them (rules/startup.py), without a server:
the options splitter, getopt (checked against the C library's own getopt), the switches,
and the refusal of masked logins. tests/integration/test_startup_auth.py proves the same
spellings against the real server."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.context import MaskingContext
from rules.loader import parse_rules
from rules.startup import (
    OptionsError,
    Setting,
    getopt,
    parse_bool,
    set_statement,
    split_identifiers,
    split_options,
    startup_settings,
    switch_settings,
)
from tests.unit.rules.fixtures import CATALOG, RULES

CTX = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", []),
        (" \t ", []),
        ("-c role=x", ["-c", "role=x"]),
        (r"-c r\ole=admin", ["-c", "role=admin"]),  # the backslash escapes 'o': dropped
        (r"-c a\ b=c", ["-c", "a b=c"]),
        (r"a\\b", ["a\\b"]),
        (r"x\\ y", ["x\\", "y"]),
        ("\\", [""]),  # a lone backslash at the end: an empty word
        (r"\ ", [" "]),
        ("\t-e\n-c\vx=y\f\r", ["-e", "-c", "x=y"]),  # every C isspace() character
        ("-c  role=x  ", ["-c", "role=x"]),
    ],
)
def test_split_options(text: str, words: list[str]) -> None:
    assert split_options(text) == words


_WORD = st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("\t\n\\"))


@given(
    words=st.lists(_WORD.filter(bool), max_size=6),
    gaps=st.lists(st.text(" \t\n\v\f\r", min_size=1, max_size=3), min_size=7, max_size=7),
    escape_all=st.booleans(),
)
def test_split_options_round_trip(words: list[str], gaps: list[str], escape_all: bool) -> None:
    """Any words, written with each space and backslash escaped (or every character), and
    separated by any whitespace, split back into themselves."""

    def escaped(word: str) -> str:
        return "".join("\\" + c if escape_all or c in " \t\n\v\f\r\\" else c for c in word)

    text = gaps[0].lstrip() + "".join(escaped(w) + gaps[i + 1] for i, w in enumerate(words))
    assert split_options(text) == words


def _libc_getopt() -> ctypes.CDLL:
    name = ctypes.util.find_library("c")
    assert name is not None, "the C library is needed to compare getopt"
    libc = ctypes.CDLL(name)
    libc.getopt.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p), ctypes.c_char_p]
    libc.getopt.restype = ctypes.c_int
    return libc


LIBC = _libc_getopt()


def c_getopt(words: list[str]) -> tuple[list[tuple[str, str | None]], list[str] | None]:
    """The C library's getopt over ["postgres", *words], with the server's switches: the
    switches and arguments until -1 or '?', and argv[optind:] after permuting (None when
    getopt stopped at an error)."""
    optind = ctypes.c_int.in_dll(LIBC, "optind")
    opterr = ctypes.c_int.in_dll(LIBC, "opterr")
    optarg = ctypes.c_char_p.in_dll(LIBC, "optarg")
    argv = [b"postgres", *(w.encode() for w in words)]
    array = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    optind.value = 0  # glibc: 0 re-initialises everything
    opterr.value = 0
    out: list[tuple[str, str | None]] = []
    while True:
        c = LIBC.getopt(len(argv), array, b"B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:")
        if c == -1:
            break
        if c == ord("?"):
            return out, None
        value = optarg.value
        out.append((chr(c), value.decode() if value is not None else None))
    return out, [(array[i] or b"").decode() for i in range(optind.value, len(argv))]


_TOKENS = st.sampled_from(
    [
        "-c", "role=x", "-crole=x", "--role=x", "-ec", "-Ecrole=x", "-e", "-E", "--", "-",
        "foo", "-x", "-f", "s", "-W", "5", "---a=b", "-d", "3", "-cx", "-c-", "-P", "-ee",
        "-S", "-Sx", "-:", "-ce",
    ]
)  # fmt: skip


def test_getopt_is_the_c_librarys() -> None:
    assert "POSIXLY_CORRECT" not in os.environ  # glibc would stop at the first operand
    for words in (["foo", "-crole=x"], ["-c", "--"], ["--", "-c", "x"], ["-e", "a", "-cb", "c"]):
        got = getopt(words)
        switches, rest = c_getopt(words)
        assert (list(got.switches), list(got.operands)) == (switches, rest)


@settings(max_examples=400)
@given(words=st.lists(_TOKENS, max_size=8))
def test_getopt_agrees_with_the_c_library(words: list[str]) -> None:
    """glibc's getopt, permutation included, on the server's switches: the same switches
    with the same arguments, the same operands, and an error exactly where it stops."""
    got = getopt(words)
    switches, rest = c_getopt(words)
    assert list(got.switches) == switches
    if rest is None:
        assert got.error is not None
    else:
        assert got.error is None and list(got.operands) == rest


def _s(name: str, value: str) -> Setting:
    return Setting(name, value, "options")


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["-c", "role=admin"], [_s("role", "admin")]),
        (["-crole=admin"], [_s("role", "admin")]),
        (["--role=admin"], [_s("role", "admin")]),
        (["-ec", "role=x"], [_s("datestyle", "euro"), _s("role", "x")]),
        (["-Ecrole=x"], [_s("role", "x")]),  # -E is read from the server's command line only
        (["-c", "ROLE=x"], [_s("role", "x")]),
        (["-c", "Role=a=b"], [_s("role", "a=b")]),  # the name ends at the first '='
        (["-c", "session-authorization=x"], [_s("session_authorization", "x")]),
        (["--session-authorization=x"], [_s("session_authorization", "x")]),
        (["--Session_Authorization=x"], [_s("session_authorization", "x")]),
        (["-c", "a-b=c-d"], [_s("a_b", "c-d")]),  # '-' reads as '_' in the name only
        (["-c", "a=1", "--"], [_s("a", "1")]),
        (["-f", "s"], [_s("enable_seqscan", "false")]),
        (["-fh"], [_s("enable_hashjoin", "false")]),
        (["-t", "pa"], [_s("log_parser_stats", "true")]),
        (["-t", "pl"], [_s("log_planner_stats", "true")]),
        (["-t", "ex"], [_s("log_executor_stats", "true")]),
        (
            ["-d", "3"],
            [
                _s("log_min_messages", "debug3"),
                _s("log_statement", "all"),
                _s("debug_print_parse", "true"),
            ],
        ),
        (["-d", "x"], [_s("log_min_messages", "notice")]),
        (["-S", "1MB"], [_s("work_mem", "1MB")]),
        (["-W", "5"], [_s("post_auth_delay", "5")]),
        (["-P"], [_s("ignore_system_indexes", "true")]),
        (["-D", "/x", "-E", "-b", "-j", "-n", "-T", "-r", "f", "-v", "3", "-C", "x"], []),
    ],
)
def test_switch_settings(words: list[str], expected: list[Setting]) -> None:
    assert switch_settings(words) == expected


@pytest.mark.parametrize(
    "words",
    [
        ["-c", "role"],  # no value
        ["--role"],
        ["-c", "--"],
        ["-c"],
        ["foo"],  # an operand: the server takes no database name from a client
        ["--", "-c", "role=x"],
        ["-e", "foo", "-c", "role=x"],  # the server sets role, then refuses the login
        ["-x"],
        ["-f", "z"],
        ["-t", "p"],
        [""],
    ],
)
def test_switches_the_server_refuses(words: list[str]) -> None:
    with pytest.raises(OptionsError):
        switch_settings(words)


def test_startup_settings_order_and_keys() -> None:
    pairs = [
        ("user", "u"),
        ("database", "d"),
        ("options", "-c a=1"),
        ("Role", "x"),
        ("_pq_.compression", "on"),
        ("replication", "false"),
        ("options", "-c b=2"),  # the last options key is the one the server reads
        ("application_name", "app"),
        ("User", "v"),  # keys are compared case-sensitively: this one is a setting
    ]
    assert startup_settings(pairs) == [
        _s("b", "2"),
        Setting("role", "x", "startup packet"),
        Setting("application_name", "app", "startup packet"),
        Setting("user", "v", "startup packet"),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("t", True), ("TRUE", True), ("tru", True), ("yes", True), ("y", True), ("on", True),
        ("1", True), ("f", False), ("False", False), ("no", False), ("n", False),
        ("of", False), ("off", False), ("0", False), ("o", None), ("", None), ("truex", None),
        ("database", None), ("2", None), ("10", None), (" true", None),
    ],
)  # fmt: skip
def test_parse_bool(value: str, expected: bool | None) -> None:
    assert parse_bool(value) is expected


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("", []),
        ("  ", []),
        ("a, b", ["a", "b"]),
        ("a , b", ["a", "b"]),
        ("PG_TEMP, billing", ["pg_temp", "billing"]),
        ('"PG_TEMP"', ["PG_TEMP"]),
        ('"a""b", c', ['a"b', "c"]),
        ('"$user", public', ["$user", "public"]),
        ("\tx\n,\ry\f", ["x", "y"]),
        ("a" * 70, ["a" * 63]),
        ("a,", None),
        (",a", None),
        ('"a', None),
        ("a b", None),
        ("a\vb", ["a\vb"]),  # no vertical tab in scanner_isspace()
    ],
)
def test_split_identifiers(value: str, names: list[str] | None) -> None:
    assert split_identifiers(value) == names


def test_set_statement() -> None:
    assert set_statement(_s("work_mem", "7MB")) == "SET \"work_mem\" TO '7MB'"
    assert set_statement(_s("x", "it's")) == "SET \"x\" TO 'it''s'"
    assert set_statement(_s("search_path", "billing, PG_TEMP")) == (
        "SET \"search_path\" TO 'billing', 'pg_temp'"
    )
    assert set_statement(_s("search_path", "")) == "SET \"search_path\" TO ''"
    assert set_statement(_s("search_path", "a,")) is None


def _refusal(*pairs: tuple[str, str]) -> str | None:
    return CTX.startup_refusal([("user", "helpdesk"), ("database", "billing"), *pairs])


@pytest.mark.parametrize(
    "options",
    [
        "-c role=x",
        r"-c r\ole=x",
        r"-c \r\o\l\e=x",
        "-crole=x",
        "--role=x",
        "-ec role=x",
        "-Ecrole=x",
        "-c ROLE=x",
        "--ROLE=x",
        "-e -c Role=x",
        "-c application_name=x -c role=x",
        r"-c r\ole=a\ b",
    ],
)
def test_masked_role_in_the_options_is_refused(options: str) -> None:
    assert _refusal(("options", options)) == "masked roles may not set role at login"


@pytest.mark.parametrize(
    "options",
    [
        "-c session_authorization=x",
        "-c session-authorization=x",
        "--session-authorization=x",
        "--SESSION_AUTHORIZATION=x",
        r"-c session\_authorization=x",
    ],
)
def test_masked_session_authorization_in_the_options_is_refused(options: str) -> None:
    assert _refusal(("options", options)) == (
        "masked roles may not set session_authorization at login"
    )


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        ([("Role", "x")], "masked roles may not set role at login"),
        ([("ROLE", "x")], "masked roles may not set role at login"),
        ([("Session_Authorization", "x")], "masked roles may not set session_authorization"),
        ([("options", "-c backslash_quote=on")], "may not change backslash_quote"),
        ([("options", "-c local_preload_libraries=x")], "loads server code"),
        ([("session_preload_libraries", "x")], "loads server code"),
        ([("replication", "database")], "replication"),
        ([("replication", "true")], "replication"),
        ([("replication", "Y")], "replication"),
        ([("replication", "bogus")], "replication"),
        ([("options", "-c application_name=caf\u00e9")], "only ASCII"),
        ([("options", "bogus")], "cannot be read"),
        ([("options", "-c role")], "cannot be read"),
        ([("_pq_.x", "1")], "protocol extensions"),
        ([("options", "-c search_path=a,")], "search_path at login: its value cannot be read"),
        ([("options", "-c =x")], "a startup parameter at login: pgveil cannot parse"),
    ],
)
def test_masked_refusals(pairs: list[tuple[str, str]], reason: str) -> None:
    got = _refusal(*pairs)
    assert got is not None and reason in got, got


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("application_name", "psql"), ("client_encoding", "UTF8"), ("DateStyle", "ISO")],
        [("options", "-c work_mem=64MB -e --statement-timeout=5s -fs")],
        [("options", "-c search_path=pg_temp,billing")],
        # pg_temp anywhere: unknown names are pinned to pg_temp by the analyser
        [("options", "-c search_path=billing,pg_temp")],
        [("search_path", "billing, pg_temp")],
        [("options", '-c search_path="PG_TEMP",billing')],  # a schema named PG_TEMP
        [("search_path", "billing")],
        [("replication", "false"), ("replication", "off"), ("replication", "n")],
        [("client_encoding", "LATIN1")],  # checked on the server's report after login
        [("options", "-c standard_conforming_strings=off")],  # likewise
        [("options", "-c role=x"), ("options", "-c work_mem=1MB")],  # the last one counts
    ],
)
def test_masked_logins_allowed(pairs: list[tuple[str, str]]) -> None:
    assert _refusal(*pairs) is None


def test_refusal_never_repeats_a_value() -> None:
    secret = "Zebulon Quixotehart"
    for pairs in (
        [("options", f"-c search_path=x,pg_temp,{secret.replace(' ', '')},")],
        [("Role", secret)],
        [("options", f"-c role={secret.replace(' ', '_')}")],
        [("options", f"{secret.replace(' ', '')}")],
    ):
        got = _refusal(*pairs)
        assert got is not None and "Zebulon" not in got and "Quixote" not in got
