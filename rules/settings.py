"""What a statement does to the settings that decide how the server reads statement text:
`client_encoding` (the bytes of every later message are converted from it) and
`standard_conforming_strings` (off: a backslash escapes the quote in '...' strings).

`settings_of` turns parsed statements into setting operations, in the order the server
applies them, for the session's prediction of what each later message is read under
(proxy/session/reading.py): SET and SET LOCAL of either setting (SET NAMES is
client_encoding), RESET, RESET ALL, DISCARD ALL, `set_config` called with constants, and
transaction control (a rollback undoes SET, a transaction's end undoes SET LOCAL). Any
statement that may run code the server keeps (a function, a trigger, a view, a COMMIT's
deferred triggers) may change them unseen: it gets a `code` operation.

Encoding names are read as the server reads them (src/common/encnames.c: only ASCII letters
and digits count, case-insensitively), boolean values as parse_bool reads them.
`keeps_pinned` and `set_config_keeps_pinned` tell the analyser which SETs of the settings
masked sessions must keep leave them as they are (rules.denied.PINNED_SETTINGS).

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any, Final

from pglast import ast

from rules.denied import PINNED_SETTINGS, REPORTED_SETTINGS
from rules.nodes import descendants

# (kind, setting, value). kinds: set, local (SET LOCAL: until the transaction ends), reset_all
# (RESET ALL, DISCARD ALL), begin, commit, rollback, savepoint, release, rollback_to (the
# savepoint's name in the second place), code (may change either setting unseen).
# A value is canonical (an encoding's name as the server reports it, "on" or "off"),
# DEFAULT (the session's value at login: RESET, SET ... TO DEFAULT) or "" (one pgveil cannot
# tell: the statement may fail, or set a value it cannot name).
SettingOp = tuple[str, str, str]

CLIENT_ENCODING = "client_encoding"
CONFORMING = "standard_conforming_strings"
READING = frozenset({CLIENT_ENCODING, CONFORMING})
DEFAULT = "DEFAULT"
CODE: SettingOp = ("code", "", "")

# encnames.c: every name and alias the server accepts, cleaned (ASCII letters and digits,
# lower case), and the encoding's own name, which ParameterStatus reports
_ENCODINGS = {
    "abc": "WIN1258", "alt": "WIN866", "big5": "BIG5", "euccn": "EUC_CN",
    "eucjis2004": "EUC_JIS_2004", "eucjp": "EUC_JP", "euckr": "EUC_KR", "euctw": "EUC_TW",
    "gb18030": "GB18030", "gbk": "GBK", "iso88591": "LATIN1", "iso885910": "LATIN6",
    "iso885913": "LATIN7", "iso885914": "LATIN8", "iso885915": "LATIN9",
    "iso885916": "LATIN10", "iso88592": "LATIN2", "iso88593": "LATIN3", "iso88594": "LATIN4",
    "iso88595": "ISO_8859_5", "iso88596": "ISO_8859_6", "iso88597": "ISO_8859_7",
    "iso88598": "ISO_8859_8", "iso88599": "LATIN5", "johab": "JOHAB", "koi8": "KOI8R",
    "koi8r": "KOI8R", "koi8u": "KOI8U", "latin1": "LATIN1", "latin10": "LATIN10",
    "latin2": "LATIN2", "latin3": "LATIN3", "latin4": "LATIN4", "latin5": "LATIN5",
    "latin6": "LATIN6", "latin7": "LATIN7", "latin8": "LATIN8", "latin9": "LATIN9",
    "mskanji": "SJIS", "muleinternal": "MULE_INTERNAL", "shiftjis": "SJIS",
    "shiftjis2004": "SHIFT_JIS_2004", "sjis": "SJIS", "sqlascii": "SQL_ASCII",
    "tcvn": "WIN1258", "tcvn5712": "WIN1258", "uhc": "UHC", "unicode": "UTF8", "utf8": "UTF8",
    "vscii": "WIN1258", "win": "WIN1251", "win1250": "WIN1250", "win1251": "WIN1251",
    "win1252": "WIN1252", "win1253": "WIN1253", "win1254": "WIN1254", "win1255": "WIN1255",
    "win1256": "WIN1256", "win1257": "WIN1257", "win1258": "WIN1258", "win866": "WIN866",
    "win874": "WIN874", "win932": "SJIS", "win936": "GBK", "win949": "UHC", "win950": "BIG5",
    "windows1250": "WIN1250", "windows1251": "WIN1251", "windows1252": "WIN1252",
    "windows1253": "WIN1253", "windows1254": "WIN1254", "windows1255": "WIN1255",
    "windows1256": "WIN1256", "windows1257": "WIN1257", "windows1258": "WIN1258",
    "windows866": "WIN866", "windows874": "WIN874", "windows932": "SJIS",
    "windows936": "GBK", "windows949": "UHC", "windows950": "BIG5",
}  # fmt: skip
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# parse_bool_with_len: a prefix of true/false/yes/no (one letter at least), on, off (two
# letters at least: "o" is ambiguous), 1, 0
# backslash_quote's enumeration (guc_tables.c: backslash_quote_options, hidden ones too)
_BACKSLASH_QUOTE = frozenset({"safe_encoding", "on", "off", "true", "false", "yes", "no", "1", "0"})
_TRUE = ("true", "yes")
_FALSE = ("false", "no")
# what each transaction statement does (rules.effects' effect kinds)
TX_KINDS: Final = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback_to",
    "TRANS_STMT_PREPARE": "prepare_transaction",
}
# PREPARE TRANSACTION ends the transaction as a commit does, for the settings
_TX = {**TX_KINDS, "TRANS_STMT_PREPARE": "commit"}
# statements that run no code of the database's (beyond the server's own): what they do to
# the settings is all in their text (CLOSE is not among them: closing a cursor shuts down
# what its query was running)
_NO_CODE = (
    ast.VariableShowStmt, ast.DeallocateStmt, ast.PrepareStmt, ast.ListenStmt,
    ast.UnlistenStmt, ast.NotifyStmt,
)  # fmt: skip


def encoding_name(name: str) -> str:
    """The server's name of a client encoding given as `name` (an alias, any case, with
    any punctuation), or "" when the server knows no such encoding."""
    cleaned = "".join(c for c in name if c in _ALNUM).translate(_ASCII_LOWER)
    return _ENCODINGS.get(cleaned, "")


def boolean(value: str) -> str:
    """The server's reading of a boolean setting's value: "on", "off", or "" (none)."""
    v = value.translate(_ASCII_LOWER)  # (no space is trimmed)
    if not v:
        return ""
    if v in ("1", "on") or any(w.startswith(v) for w in _TRUE):
        return "on"
    if v in ("0", "off", "of") or any(w.startswith(v) for w in _FALSE):
        return "off"
    return ""


def canonical(setting: str, value: str) -> str:
    """A reading setting's value as the server reports it ("" when it cannot be told)."""
    if setting == CLIENT_ENCODING:
        return encoding_name(value)
    return boolean(value)


def pinned_value(setting: str, value: str) -> str:
    """The value of a setting the session guard pins (rules.denied.PINNED_SETTINGS) as the
    server reads it: a reading setting's canonical value, backslash_quote's enumeration
    name in lower case (the server compares those ignoring case); "" when none."""
    if setting in READING:
        return canonical(setting, value)
    v = value.translate(_ASCII_LOWER)
    return v if v in _BACKSLASH_QUOTE else ""


def keeps_pinned(setting: str, node: Any) -> bool:
    """Whether a SET statement (SET, SET LOCAL, SET SESSION, RESET; SET NAMES is
    client_encoding) of a setting the guard pins leaves it at the value the guard requires,
    which a masked session always has: it sets that very value, as the server reads it;
    or it returns to the value at login, which the session checked (RESET, DEFAULT; only
    for the settings the server reports); or it sets the value it has (FROM CURRENT)."""
    required = PINNED_SETTINGS.get(setting)
    if required is None:
        return False
    kind = getattr(node.kind, "name", "")
    if kind == "VAR_SET_CURRENT":
        return True
    if kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
        return setting in REPORTED_SETTINGS
    if kind != "VAR_SET_VALUE":
        return False
    args: tuple[Any, ...] = tuple(node.args or ())
    value = _constant(args[0]) if len(args) == 1 else None
    return value is not None and pinned_value(setting, value) == required


def set_config_keeps_pinned(setting: str, args: Any) -> bool:
    """The same for `set_config(setting, value, is_local)`: its value a constant that the
    server reads as the required one, or NULL (the value at login, like RESET) for a
    setting the server reports. Either scope keeps it."""
    required = PINNED_SETTINGS.get(setting)
    args = tuple(args or ())
    if required is None or len(args) != 3 or not isinstance(args[1], ast.A_Const):
        return False
    if args[1].isnull:
        return setting in REPORTED_SETTINGS
    value = _constant(args[1])
    return value is not None and pinned_value(setting, value) == required


def settings_of(stmts: Any, sql: str) -> tuple[SettingOp, ...]:
    """The setting operations of parsed statements, in order (see the module docstring);
    `sql` is their text (set_config is looked for only where it is named)."""
    ops: list[SettingOp] = []
    calls = "set_config" in sql.lower()
    for raw in stmts:
        ops += _statement(raw.stmt, calls)
    return tuple(ops)


def _statement(node: Any, calls: bool) -> list[SettingOp]:
    if isinstance(node, ast.VariableSetStmt):
        return _variable_set(node)
    if isinstance(node, ast.TransactionStmt):
        kind = _TX.get(getattr(node.kind, "name", ""))
        if kind is None:
            return []  # COMMIT PREPARED, ROLLBACK PREPARED: another session's transaction
        ops: list[SettingOp] = [(kind, node.savepoint_name or "", "")]
        if kind == "commit":
            ops.insert(0, CODE)  # deferred triggers run first
        if (kind == "commit" or kind == "rollback") and node.chain:
            ops.append(("begin", "", ""))
        return ops
    if isinstance(node, ast.DiscardStmt):
        return [("reset_all", "", "")] if getattr(node.target, "name", "") == "DISCARD_ALL" else []
    if isinstance(node, _NO_CODE):
        return []
    return [CODE, *(_set_config_calls(node) if calls else ())]


def _variable_set(node: Any) -> list[SettingOp]:
    kind = node.kind.name
    if kind == "VAR_RESET_ALL":
        return [("reset_all", "", "")]
    setting = (node.name or "").translate(_ASCII_LOWER)
    if setting not in READING:
        return []
    scope = "local" if node.is_local else "set"
    if kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
        return [(scope, setting, DEFAULT)]
    if kind != "VAR_SET_VALUE":
        return []  # FROM CURRENT: the value it has
    args: tuple[Any, ...] = tuple(node.args or ())
    value = _constant(args[0]) if len(args) == 1 else None
    return [(scope, setting, canonical(setting, value) if value is not None else "")]


def _constant(node: Any) -> str | None:
    """The text of a constant as the server passes it to a setting (None: no constant)."""
    if not isinstance(node, ast.A_Const) or node.isnull:
        return None
    val = node.val
    if isinstance(val, ast.String):
        return str(val.sval)
    if isinstance(val, ast.Integer):
        return str(val.ival)
    if isinstance(val, ast.Float):
        return str(val.fval)
    if isinstance(val, ast.Boolean):
        return "on" if val.boolval else "off"
    return None


def _set_config_calls(node: Any) -> list[SettingOp]:
    """set_config(setting, value, is_local) calls with constant arguments on a reading
    setting, in the order they stand in the text (the order they run is the plan's: the
    session's prediction is checked against the server's report either way)."""
    found: list[tuple[int, SettingOp]] = []
    for n in descendants(node):
        if not isinstance(n, ast.FuncCall) or not n.funcname:
            continue
        names = [str(p.sval) for p in n.funcname if isinstance(p, ast.String)]
        if names[-1:] != ["set_config"] or names[:-1] not in ([], ["pg_catalog"]):
            continue
        args = n.args or ()
        texts = [_constant(a) for a in args]
        if len(texts) != 3 or texts[0] is None:
            continue
        setting = texts[0].translate(_ASCII_LOWER)
        if setting not in READING:
            continue
        value = canonical(setting, texts[1]) if texts[1] is not None else ""
        local = boolean(texts[2]) if texts[2] is not None else ""
        scope = "local" if local == "on" else "set"
        if local == "":
            value = ""  # it fails, or sets it either way: cannot be told
        found.append((n.location or 0, (scope, setting, value)))
    return [op for _, op in sorted(found, key=lambda x: x[0])]
