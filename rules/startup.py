"""What a login's startup packet sets, read as PostgreSQL 15 reads it, and which of those
settings a masked login may not make.

The server reads the startup packet's `options` in two steps: `pg_split_opts`
(src/backend/utils/init/postinit.c) splits the text into words at whitespace, a backslash
escaping the character after it (the backslash itself is dropped); then
`process_postgres_switches` (src/backend/tcop/postgres.c) reads the words with glibc's
`getopt` and the server's own switches. `-c name=value` and `--name=value` set a
configuration parameter (in `-c`'s name and `--`'s, '-' reads as '_'); most other switches
set one too (`-e` sets datestyle, `-S` work_mem, ...). Every other key of the startup packet
that is not user, database, options, replication or `_pq_.*` is itself a parameter setting,
applied after the options. Parameter names are compared ignoring ASCII case.

`startup_settings` returns what a packet sets, in the order the server applies it;
`masked_refusal` says why a masked login may not start with them. Pure: no I/O. It must not
put a setting's value in a reason (values are whatever the client sent).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# isspace() in the C and UTF-8 locales; bytes above 127 depend on the server's locale, so
# masked logins may use only ASCII in `options` (see masked_refusal)
_SPACE = frozenset(" \t\n\v\f\r")
# scanner_isspace() (SplitIdentifierString): no vertical tab
_IDENT_SPACE = frozenset(" \t\n\r\f")
_NAMEDATALEN = 64

OPTSTRING = "B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:"
"""The switches of process_postgres_switches (PostgreSQL 15); ':' marks an argument."""

# keys of the startup packet that are not parameter settings (compared case-sensitively,
# as ProcessStartupPacket does with strcmp)
_NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})

# switch -> the parameter it sets and the value, for switches without an argument
_FLAG_SETTINGS = {
    "e": ("datestyle", "euro"),
    "F": ("fsync", "false"),
    "i": ("listen_addresses", "*"),
    "l": ("ssl", "true"),
    "O": ("allow_system_table_mods", "true"),
    "P": ("ignore_system_indexes", "true"),
    "s": ("log_statement_stats", "true"),
}
# switch -> the parameter its argument sets
_ARGUMENT_SETTINGS = {
    "B": "shared_buffers",
    "h": "listen_addresses",
    "k": "unix_socket_directories",
    "N": "max_connections",
    "p": "port",
    "S": "work_mem",
    "W": "post_auth_delay",
}
# switches the server reads only from its own command line, never from a client
_SECURE_ONLY = frozenset("bCDEjnrTv")
_DEBUG_PRINTS = ((3, "debug_print_parse"), (4, "debug_print_plan"), (5, "debug_print_rewritten"))
_PLAN_DISABLING = {
    "s": "enable_seqscan",
    "i": "enable_indexscan",
    "o": "enable_indexonlyscan",
    "b": "enable_bitmapscan",
    "t": "enable_tidscan",
    "n": "enable_nestloop",
    "m": "enable_mergejoin",
    "h": "enable_hashjoin",
}

# A masked login may not set these: who the session runs as
_IDENTITY = frozenset({"role", "session_authorization"})
# ... nor load server code at session start (a masked session may not run LOAD either)
_LIBRARIES = frozenset({"local_preload_libraries", "session_preload_libraries"})
# The server reports these (ParameterStatus) and pgveil checks the reported value once the
# login completes, whatever set it: their value is judged there, exactly, not here.
_REPORTED = frozenset({"client_encoding", "standard_conforming_strings"})
# parameters whose value the server reads as a list of identifiers (GUC_LIST_QUOTE that
# check hooks split with SplitIdentifierString)
_IDENTIFIER_LISTS = frozenset({"search_path", "temp_tablespaces"})
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_.]{0,62}")


class OptionsError(ValueError):
    """The server would refuse these startup options (it ends the login with a FATAL)."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One parameter assignment of the startup packet. `name` is as the server looks it
    up: ASCII lower case; `origin` is "options" or "startup packet"."""

    name: str
    value: str
    origin: str


def fold(name: str) -> str:
    """A parameter name as guc_name_compare compares it: ASCII letters in lower case only."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def split_options(text: str) -> list[str]:
    """The words of `options` as pg_split_opts makes them."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n:
            break
        word: list[str] = []
        escaped = False
        while i < n:
            c = text[i]
            if c in _SPACE and not escaped:
                break
            if not escaped and c == "\\":
                escaped = True
            else:
                escaped = False
                word.append(c)
            i += 1
        words.append("".join(word))
    return words


@dataclass(frozen=True, slots=True)
class Getopt:
    """What glibc's getopt returns for `argv` (without argv[0]): the switches in order with
    their arguments, the words that are no switches (moved to the end, as glibc permutes
    them), and the error that stopped it ('?' from getopt), if one did."""

    switches: tuple[tuple[str, str | None], ...]
    operands: tuple[str, ...]
    error: str | None


def getopt(argv: Sequence[str], optstring: str = OPTSTRING) -> Getopt:
    """glibc getopt(3) in its default (permuting) mode, without long options."""
    takes = frozenset(c for i, c in enumerate(optstring) if optstring[i + 1 : i + 2] == ":")
    known = frozenset(optstring) - {":"}
    switches: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i, n = 0, len(argv)
    while i < n:
        arg = argv[i]
        i += 1
        if arg == "--":
            operands.extend(argv[i:])  # the end of the switches; the rest are operands
            break
        if arg[:1] != "-" or arg == "-":
            operands.append(arg)  # permuted to the end; switches after it are still read
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c not in known:
                return Getopt(tuple(switches), (*operands, *argv[i:]), f"invalid option -{c}")
            if c in takes:
                if j < len(arg):
                    optarg = arg[j:]
                elif i < n:
                    optarg = argv[i]  # the next word, whatever it looks like
                    i += 1
                else:
                    return Getopt(tuple(switches), tuple(operands), f"-{c} requires an argument")
                switches.append((c, optarg))
                break
            switches.append((c, None))
    return Getopt(tuple(switches), tuple(operands), None)


def _parse_long_option(text: str) -> tuple[str, str | None]:
    """ParseLongOption: name and value at the first '='; '-' in the name reads as '_'."""
    name, eq, value = text.partition("=")
    return name.replace("-", "_"), (value if eq else None)


def _atoi(text: str) -> int:
    m = re.match(r"[ \t\n\v\f\r]*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


def switch_settings(words: Sequence[str]) -> list[Setting]:
    """The parameter settings of the words of `options`, as process_postgres_switches makes
    them for a client (switches the server reads only from its own command line set
    nothing). OptionsError when the server would refuse them."""
    got = getopt(words)
    if got.error is not None:
        raise OptionsError(got.error)
    out: list[Setting] = []

    def add(name: str, value: str) -> None:
        out.append(Setting(fold(name), value, "options"))

    for flag, arg in got.switches:
        if flag in ("c", "-"):
            assert arg is not None
            name, value = _parse_long_option(arg)
            if value is None:
                raise OptionsError(f"-{flag} {name} requires a value")
            add(name, value)
        elif flag in _FLAG_SETTINGS:
            add(*_FLAG_SETTINGS[flag])
        elif flag in _ARGUMENT_SETTINGS:
            assert arg is not None
            add(_ARGUMENT_SETTINGS[flag], arg)
        elif flag == "d":
            assert arg is not None
            # set_debug_options
            level = _atoi(arg)
            add("log_min_messages", f"debug{level}" if level > 0 else "notice")
            if level >= 2:
                add("log_statement", "all")
            for at, name in _DEBUG_PRINTS:
                if level >= at:
                    add(name, "true")
        elif flag == "f":
            assert arg is not None
            target = _PLAN_DISABLING.get(arg[:1])
            if target is None:
                raise OptionsError(f"invalid argument for -f: {arg[:1]!r}")
            add(target, "false")
        elif flag == "t":
            assert arg is not None
            stats = {"pa": "log_parser_stats", "pl": "log_planner_stats"}.get(arg[:2])
            if stats is None and arg[:1] == "e":
                stats = "log_executor_stats"
            if stats is None:
                raise OptionsError("invalid argument for -t")
            add(stats, "true")
        else:
            assert flag in _SECURE_ONLY, flag
    if got.operands:
        # the server takes no database name from a client: any operand ends the login
        raise OptionsError("invalid command-line argument for server process")
    return out


def startup_settings(parameters: Sequence[tuple[str, str]]) -> list[Setting]:
    """Every parameter the startup packet sets, in the order the server applies them: the
    options first (the last `options` key is the one read), then the other keys in order.
    OptionsError when the server would refuse the options."""
    options = [value for key, value in parameters if key == "options"]
    out = switch_settings(split_options(options[-1])) if options else []
    for key, value in parameters:
        if key in _NOT_SETTINGS or key.startswith("_pq_."):
            continue
        out.append(Setting(fold(key), value, "startup packet"))
    return out


def parse_bool(value: str) -> bool | None:
    """parse_bool (src/backend/utils/adt/bool.c): unique prefixes of true/false/yes/no,
    on/off (two letters at least), 1/0; case-insensitive. None when it is no boolean."""
    v = fold(value)
    if not v:
        return None
    first = v[0]
    if first == "t" and "true".startswith(v):
        return True
    if first == "f" and "false".startswith(v):
        return False
    if first == "y" and "yes".startswith(v):
        return True
    if first == "n" and "no".startswith(v):
        return False
    if first == "o" and len(v) >= 2:
        if "on".startswith(v):
            return True
        if "off".startswith(v):
            return False
    if v in ("1", "0"):
        return v == "1"
    return None


def split_identifiers(value: str) -> list[str] | None:
    """SplitIdentifierString(value, ','): unquoted names in ASCII lower case, quoted ones
    as written ("" for a quote), each cut to 63 bytes. None when the server would refuse
    the list."""
    names: list[str] = []
    i, n = 0, len(value)
    while i < n and value[i] in _IDENT_SPACE:
        i += 1
    if i == n:
        return names
    while True:
        if i == n:
            return None  # a separator with no name after it
        if value[i] == '"':
            name: list[str] = []
            i += 1
            while True:
                end = value.find('"', i)
                if end < 0:
                    return None
                name.append(value[i:end])
                if value[end + 1 : end + 2] == '"':
                    name.append('"')
                    i = end + 2
                    continue
                i = end + 1
                break
            current = "".join(name)
        else:
            start = i
            while i < n and value[i] != "," and value[i] not in _IDENT_SPACE:
                i += 1
            if i == start:
                return None
            current = fold(value[start:i])
        while i < n and value[i] in _IDENT_SPACE:
            i += 1
        names.append(_truncate(current))
        if i == n:
            return names
        if value[i] != ",":
            return None
        i += 1
        while i < n and value[i] in _IDENT_SPACE:
            i += 1


def _truncate(name: str) -> str:
    """truncate_identifier: at most NAMEDATALEN-1 bytes, never half a character."""
    raw = name.encode()
    if len(raw) < _NAMEDATALEN:
        return name
    return raw[: _NAMEDATALEN - 1].decode(errors="ignore")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def set_statement(setting: Setting) -> str | None:
    """The SET statement that makes the same assignment in a session, for the analyser to
    judge; None when the value is one the server would refuse."""
    name = '"' + setting.name.replace('"', '""') + '"'
    if setting.name in _IDENTIFIER_LISTS:
        # the server splits the text into names; SET lists them (each one a string, which
        # the server quotes back as that exact name)
        names = split_identifiers(setting.value)
        if names is None:
            return None
        return f"SET {name} TO {', '.join(_literal(x) for x in names) or _literal('')}"
    return f"SET {name} TO {_literal(setting.value)}"


def _named(setting: Setting) -> str:
    """The parameter's name for a message: only a plain name is repeated back."""
    return setting.name if _PLAIN_NAME.fullmatch(setting.name) else "a startup parameter"


def masked_refusal(
    parameters: Sequence[tuple[str, str]], judge: Callable[[str], str | None]
) -> str | None:
    """Why a masked login may not start with these startup parameters, or None.

    `judge` gets the SET statement equivalent to each setting and answers why a masked
    session may not run it (the statement analyser's verdict), or None: a setting made at
    login is judged as the same setting made by SET, except the reported parameters, whose
    value is checked once the server reports it."""
    for key, value in parameters:
        if key == "replication" and parse_bool(value) is not False:
            return "replication connections are not allowed for masked roles"
    for key, _ in parameters:
        if key.startswith("_pq_."):
            # a protocol extension the server might accept would change the wire format
            # pgveil reads
            return "masked roles may not ask for protocol extensions (_pq_.*)"
    options = [value for key, value in parameters if key == "options"]
    if options and not options[-1].isascii():
        # the server splits options with isspace(), which may take a byte above 127 for a
        # space, depending on its locale: pgveil cannot tell how it reads them
        return "masked roles may use only ASCII characters in the startup options"
    try:
        settings = startup_settings(parameters)
    except OptionsError:
        return "the startup options cannot be read as the server reads them"
    for setting in settings:
        if setting.name in _IDENTITY:
            return f"masked roles may not set {setting.name} at login"
        if setting.name in _LIBRARIES:
            return f"masked roles may not set {setting.name} at login (it loads server code)"
        if setting.name in _REPORTED:
            continue
        sql = set_statement(setting)
        reason = "its value cannot be read" if sql is None else judge(sql)
        if reason is not None:
            return f"{_named(setting)} at login: {reason}"
    return None


__all__ = [
    "OPTSTRING",
    "Getopt",
    "OptionsError",
    "Setting",
    "fold",
    "getopt",
    "masked_refusal",
    "parse_bool",
    "set_statement",
    "split_identifiers",
    "split_options",
    "startup_settings",
    "switch_settings",
]
