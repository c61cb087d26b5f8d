"""How the server reads a statement's text, and what each message will be read under.

The server reads a Query's or Parse's text when it takes the message: it converts the bytes
from the session's `client_encoding` (to its own encoding), then its lexer reads them, with
`standard_conforming_strings` deciding whether a backslash in a '...' string escapes the
character after it. A SET in a Query changes neither for that Query (its text was read
whole), only for the messages after it. The server reports both settings (ParameterStatus)
at login and before each ReadyForQuery that follows a change: after the messages that
follow the change were already read.

`statement_text` reads a message's bytes as the server would under a `Reading` (the text
pgveil's parser, which always reads standard_conforming_strings on, reads alike), or says
it cannot (None). `ReadingTracker` predicts the `Reading` of each message the client sends:
from the values at login (the reset values), the server's reports, and the setting
operations of the statements sent before it (rules.settings), which include "code": a
statement that may run the database's code may change them unseen.

What can be checked is: a request (the messages up to a Sync, a Query, a FunctionCall)
begins under what the server reports at the ReadyForQuery before it; a message sent before
that report is checked against it when it comes (the statement log does that:
proxy/session/statements.py). Within an extended-protocol request nothing is reported: after
a Bind or Execute that may have run code, a setting is known again only once a SET of it
follows; a message that depends on it before that cannot be read for sure.

Whether the difference matters is the text's own: `sensitivity` says which setting could
change how it reads (pure ASCII reads alike in every client encoding the server has, text
without a backslash alike under either value of standard_conforming_strings).

Pure: no I/O; nothing from a statement leaves this module but its text, to the caller.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Final

from mypy_extensions import mypyc_attr
from pglast.parser import ParseError, scan

from rules.settings import CLIENT_ENCODING, CODE, CONFORMING, DEFAULT, SettingOp, canonical

ENCODING: Final = 1  # the text is not pure ASCII: it reads by the client encoding
BACKSLASH: Final = 2  # it holds a backslash: it reads by standard_conforming_strings


@dataclass(frozen=True, slots=True)
class Reading:
    """What a message's text is read under. "" (an encoding) and None (conforming): a
    value pgveil cannot tell; text that depends on it cannot be read."""

    client_encoding: str = "UTF8"
    conforming: bool | None = True
    server_encoding: str = "UTF8"

    def differs(self, other: Reading, sensitive: int) -> bool:
        """Whether a text of this `sensitivity` may read otherwise under `other`."""
        if sensitive & ENCODING and self.client_encoding != other.client_encoding:
            return True
        return bool(sensitive & BACKSLASH) and self.conforming != other.conforming


UTF8: Final = Reading()


def sensitivity(raw: bytes) -> int:
    """Which settings a text's reading depends on (ENCODING, BACKSLASH bits)."""
    bits = 0 if raw.isascii() else ENCODING
    return bits | BACKSLASH if b"\\" in raw else bits


# ---- bytes -> text ------------------------------------------------------------------------

# Python's codec of each client encoding. SJIS is Windows' code page 932 in the server's
# conversion tables (CP932.TXT); the others are what their names say. EUC_TW and
# MULE_INTERNAL have none: text in them that is not ASCII is not read.
_CODECS: Final = {
    "UTF8": "utf-8", "EUC_JP": "euc_jp", "EUC_CN": "gb2312", "EUC_KR": "euc_kr",
    "EUC_JIS_2004": "euc_jis_2004", "LATIN1": "iso8859-1", "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10", "LATIN7": "iso8859-13", "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15", "LATIN10": "iso8859-16", "WIN1256": "cp1256",
    "WIN1258": "cp1258", "WIN866": "cp866", "WIN874": "cp874", "KOI8R": "koi8-r",
    "WIN1251": "cp1251", "WIN1252": "cp1252", "ISO_8859_5": "iso8859-5",
    "ISO_8859_6": "iso8859-6", "ISO_8859_7": "iso8859-7", "ISO_8859_8": "iso8859-8",
    "WIN1250": "cp1250", "WIN1253": "cp1253", "WIN1254": "cp1254", "WIN1255": "cp1255",
    "WIN1257": "cp1257", "KOI8U": "koi8-u", "SJIS": "cp932", "BIG5": "big5", "GBK": "gbk",
    "UHC": "cp949", "GB18030": "gb18030", "JOHAB": "johab", "SHIFT_JIS_2004": "shift_jis_2004",
}  # fmt: skip
# The server's characters of the encodings whose multibyte characters may hold ASCII bytes
# (the client-only ones), by pg_encoding_mblen (src/common/wchar.c): what the conversion
# takes as one character, however Python's codec splits the bytes.
_MULTIBYTE: Final = {
    "SJIS": re.compile(rb"(?:[\xa1-\xdf]|[\x80-\xa0\xe0-\xff][\x00-\xff])+"),
    "SHIFT_JIS_2004": re.compile(rb"(?:[\xa1-\xdf]|[\x80-\xa0\xe0-\xff][\x00-\xff])+"),
    "BIG5": re.compile(rb"(?:[\x80-\xff][\x00-\xff])+"),
    "GBK": re.compile(rb"(?:[\x80-\xff][\x00-\xff])+"),
    "UHC": re.compile(rb"(?:[\x80-\xff][\x00-\xff])+"),
    "GB18030": re.compile(rb"(?:[\x80-\xff][0-9][\x00-\xff]{2}|[\x80-\xff][^0-9])+"),
    "JOHAB": re.compile(rb"(?:\x8e[\x00-\xff]|\x8f[\x00-\xff]{2}|[\x80-\xff][\x00-\xff])+"),
}
_HIGH_BYTES: Final = re.compile(rb"[\x80-\xff]+")
_ASCII: Final = re.compile("[\x00-\x7f]")


def python_codec(encoding: str) -> str:
    """The Python codec that reads a value in a client encoding exactly as the server wrote
    it ("ascii" where only ASCII text is read for sure: SQL_ASCII, and the encodings whose
    characters Python's codecs map otherwise in places; "" for an unknown one: decoding
    then fails)."""
    if encoding == "SQL_ASCII" or encoding in _MULTIBYTE:
        return "ascii"
    return _CODECS.get(encoding, "")


def server_name(raw: bytes, reading: Reading) -> bytes:
    """A protocol statement or portal name as the server keys it: converted from the client
    encoding to the server's (unchanged when either is SQL_ASCII, or they are equal, or the
    name does not convert: the server then refuses the message and keeps nothing)."""
    client, server = reading.client_encoding, reading.server_encoding
    if raw.isascii() or client == server or "SQL_ASCII" in (client, server):
        return raw
    source, target = _CODECS.get(client), _CODECS.get(server)
    if source is None or target is None:
        return raw
    try:
        return raw.decode(source).encode(target)
    except UnicodeError:
        return raw


def statement_text(raw: bytes, reading: Reading) -> str | None:
    """`raw` (a statement's bytes) as the server's lexer reads it under `reading`, written
    for pgveil's parser; None when pgveil cannot read it as the server does."""
    if raw.isascii():
        text = raw.decode("ascii")  # alike in every client encoding
    else:
        decoded = _decode(raw, reading)
        if decoded is None:
            return None
        text = decoded
    if reading.conforming or "\\" not in text:
        return text
    if reading.conforming is None:
        return None
    return nonconforming_text(text)


def _decode(raw: bytes, reading: Reading) -> str | None:
    client, server = reading.client_encoding, reading.server_encoding
    if server == "SQL_ASCII" or client == "SQL_ASCII" or client == server:
        # no conversion: the lexer reads the bytes as they are (checked against the
        # server's encoding, if it has one); the catalog's names are read alike
        client = server if server != "SQL_ASCII" else "UTF8"
    codec = _CODECS.get(client)
    if codec is None:
        return None
    if codec == "utf-8":
        try:
            return raw.decode("utf-8")  # ASCII bytes are ASCII characters, nothing else is
        except UnicodeDecodeError:
            return None
    # As the server converts: a byte below 0x80 that it takes as a character of its own is
    # that ASCII character (whatever Python's codec makes of it: 0x5C is a yen sign in
    # shift_jis_2004), and each run of its other characters must read as characters that
    # are not ASCII. Then the lexer finds the same quotes, backslashes and words.
    pieces: list[str] = []
    pos = 0
    try:
        for run in _MULTIBYTE.get(client, _HIGH_BYTES).finditer(raw):
            pieces.append(raw[pos : run.start()].decode("ascii"))
            chars = codecs.decode(run.group(), codec)
            if _ASCII.search(chars):
                return None
            pieces.append(chars)
            pos = run.end()
        pieces.append(raw[pos:].decode("ascii"))
    except UnicodeDecodeError:
        return None  # not text in that encoding (a character cut short, say)
    return "".join(pieces)


# ---- standard_conforming_strings off ------------------------------------------------------


class _Unsure(Exception):
    """The text cannot be read for certain (what the server makes of it, if anything)."""


def nonconforming_text(sql: str) -> str | None:
    """`sql` as the server reads it with standard_conforming_strings off, written so that a
    parser that reads it on reads it alike: each string in plain quotes that holds a
    backslash is read as an escape string, so it gets the E prefix (N'...' becomes
    NCHAR E'...'). The result is checked with pgveil's own lexer; None when that fails
    (the text is then not read)."""
    try:
        found = _backslash_strings(sql)
    except _Unsure:
        return None
    out: list[str] = []
    marks: list[tuple[int, bool]] = []  # (where the E stands in the result, after NCHAR)
    pos = 0
    size = 0
    for quote, nchar in found:
        head = sql[pos : quote - 1] + "NCHAR" if nchar else sql[pos:quote]
        out.append(head)
        size += len(head)
        out.append(" E")
        marks.append((size + 1, nchar))
        size += 2
        pos = quote
    out.append(sql[pos:])
    text = "".join(out)
    return text if _reads_alike(text, marks) else None


def _reads_alike(text: str, marks: list[tuple[int, bool]]) -> bool:
    """Whether the server's lexer, reading `sql` with standard_conforming_strings off,
    finds the same tokens as pgveil's reads in `text` (on): every E put in begins an escape
    string there, nothing before it would have joined the quote into another token (E'',
    B'', X'', U&'', a continued string), and no string in plain quotes holds a backslash."""
    try:
        tokens = scan(text)
    except ParseError:
        return False
    starts = {t.start: i for i, t in enumerate(tokens)}
    for t in tokens:
        if t.name == "SCONST" and text[t.start] == "'" and "\\" in text[t.start : t.end + 1]:
            return False
    for mark, nchar in marks:
        i = starts.get(mark)
        if i is None or tokens[i].name != "SCONST" or i == 0:
            return False
        before = tokens[i - 1]
        word = text[before.start : before.end + 1]
        if nchar:
            if before.name != "NCHAR" or before.end != mark - 2:
                return False
            continue
        if before.end == mark - 2 and word in ("b", "B", "x", "X", "e", "E", "n", "N"):
            return False  # B'...', X'...', E'...', N'...' in the text the server reads
        if word == "&" and before.end == mark - 2 and i >= 2:
            u = tokens[i - 2]
            if u.end == before.start - 1 and text[u.start : u.end + 1] in ("u", "U"):
                return False  # U&'...'
        if before.name in ("SCONST", "BCONST", "XCONST", "USCONST"):
            gap = text[before.end + 1 : mark - 1] + "'"
            if _continuation(gap, 0) == len(gap) - 1:
                return False  # the quote continued that string
    return True


_SPACE: Final = frozenset(" \t\n\r\f")
_HORIZONTAL: Final = frozenset(" \t\f")
_NEWLINE: Final = frozenset("\n\r")
_LETTERS: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_IDENT_START: Final = frozenset(_LETTERS)
_IDENT_CONT: Final = frozenset(_LETTERS + "0123456789$")
_DIGITS: Final = frozenset("0123456789")
_XE: Final = re.compile(r"[\\']")
_COMMENT_MARK: Final = re.compile(r"/\*|\*/")
_DOLLAR_QUOTE: Final = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z_0-9\x80-\U0010ffff]*)?\$")
_PARAM: Final = re.compile(r"\$[0-9]+")
_NUMBER: Final = re.compile(r"(?:[0-9]+(?:\.(?!\.)[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _word_char(c: str, chars: frozenset[str]) -> bool:
    return c in chars or c > "\x7f"


def _backslash_strings(s: str) -> list[tuple[int, bool]]:
    """Where strings in plain quotes that hold a backslash begin, read as the server's
    lexer reads with standard_conforming_strings off (scan.l: such strings are escape
    strings), each with whether N stands before it (N'...')."""
    found: list[tuple[int, bool]] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in _SPACE:
            i += 1
        elif c == "-" and s.startswith("--", i):
            i = _line_end(s, i)
        elif c == "/" and s.startswith("/*", i):
            i = _comment_end(s, i)
        elif c == "'":
            start = i
            i, backslash = _escape_string_end(s, i)
            if backslash:
                found.append((start, False))
        elif c == '"':
            i = _quoted_end(s, i)
        elif c == "$":
            i = _dollar_end(s, i)
        elif c in _DIGITS or (c == "." and s[i + 1 : i + 2] in _DIGITS and i + 1 < n):
            m = _NUMBER.match(s, i)
            assert m is not None
            i = m.end()
            if i < n and _word_char(s[i], _IDENT_START):
                raise _Unsure  # trailing junk after a number: the server refuses it
        elif _word_char(c, _IDENT_START):
            j = i + 1
            while j < n and _word_char(s[j], _IDENT_CONT):
                j += 1
            if j == i + 1 and j < n:
                nxt = s[j]
                if nxt == "'" and c in "eE":
                    i, _ = _escape_string_end(s, j)
                    continue
                if nxt == "'" and c in "bBxX":
                    i = _bit_string_end(s, j)
                    continue
                if nxt == "'" and c in "nN":
                    end, backslash = _escape_string_end(s, j)
                    if backslash:
                        found.append((j, True))
                    i = end
                    continue
                if nxt == "&" and c in "uU" and s[j + 1 : j + 2] in ("'", '"'):
                    if s[j + 1] == "'":
                        raise _Unsure  # U&'...' with standard_conforming_strings off: refused
                    i = _quoted_end(s, j + 1)
                    continue
            i = j
        else:
            i += 1
    return found


def _line_end(s: str, i: int) -> int:
    """The end of a -- comment (the newline is not part of it)."""
    ends = [k for k in (s.find("\n", i), s.find("\r", i)) if k >= 0]
    return min(ends) if ends else len(s)


def _comment_end(s: str, i: int) -> int:
    """The end of a /* comment */ beginning at `i` (they nest)."""
    depth = 0
    pos = i + 2
    while True:
        m = _COMMENT_MARK.search(s, pos)
        if m is None:
            raise _Unsure  # unterminated: the server refuses it
        pos = m.end()
        if m.group() == "/*":
            depth += 1
        elif depth:
            depth -= 1
        else:
            return pos


def _continuation(s: str, i: int) -> int:
    """Where a string that ended just before `i` continues (the quote of the next part:
    whitespace with a newline between, scan.l's {quotecontinue}), or -1."""
    n = len(s)
    k = i
    while k < n:
        if s[k] in _HORIZONTAL:
            k += 1
        elif s.startswith("--", k):
            k = _line_end(s, k)
        else:
            break
    if k >= n or s[k] not in _NEWLINE:
        return -1
    k += 1
    while k < n:
        if s[k] in _SPACE:
            k += 1
        elif s.startswith("--", k):
            k = _line_end(s, k)
            if k >= n:
                return -1  # a comment must end with its newline here
        else:
            break
    return k if k < n and s[k] == "'" else -1


def _escape_string_end(s: str, quote: int) -> tuple[int, bool]:
    """The end of an escape string whose quote is at `quote` (with its continuations), and
    whether it holds a backslash."""
    backslash = False
    j = quote + 1
    while True:
        m = _XE.search(s, j)
        if m is None:
            raise _Unsure  # unterminated
        j = m.start()
        if s[j] == "\\":
            backslash = True
            if j + 1 >= len(s):
                raise _Unsure
            j += 2  # the backslash and what it escapes (a quote, too)
        elif s.startswith("''", j):
            j += 2
        else:
            k = _continuation(s, j + 1)
            if k < 0:
                return j + 1, backslash
            j = k + 1


def _bit_string_end(s: str, quote: int) -> int:
    """The end of a B'...' or X'...' string (no escapes; continuations)."""
    j = quote + 1
    while True:
        end = s.find("'", j)
        if end < 0:
            raise _Unsure
        k = _continuation(s, end + 1)
        if k < 0:
            return end + 1
        j = k + 1


def _quoted_end(s: str, quote: int) -> int:
    """The end of a "quoted identifier" ("" stands for ")."""
    j = quote + 1
    while True:
        end = s.find('"', j)
        if end < 0:
            raise _Unsure
        if s.startswith('""', end):
            j = end + 2
            continue
        return end + 1


def _dollar_end(s: str, i: int) -> int:
    """The end of what a $ at a token's start begins: a $tag$ string, a parameter, or the
    $ alone (scan.l's {dolqfailed})."""
    m = _DOLLAR_QUOTE.match(s, i)
    if m is not None:
        end = s.find(m.group(), m.end())
        if end < 0:
            raise _Unsure
        return end + len(m.group())
    m = _PARAM.match(s, i)
    if m is not None:
        if m.end() < len(s) and _word_char(s[m.end()], _IDENT_START):
            raise _Unsure  # trailing junk after a parameter
        return m.end()
    return i + 1


# ---- what each message is read under --------------------------------------------------------

_PARAMETERS: Final = (CLIENT_ENCODING, CONFORMING)
_BOOLEAN: Final = {"on": True, "off": False}
_JUST_CODE: Final = (CODE,)


class _Values:
    """The reading settings as predicted, with the server's transaction rules: SET lasts
    unless its transaction rolls back, SET LOCAL until its transaction ends, a rollback to
    a savepoint undoes what followed it. Values are canonical ("" when not known)."""

    __slots__ = ("block", "changed", "login", "marks", "now", "session", "start", "touched")

    def __init__(self, login: dict[str, str]) -> None:
        self.login = login
        self.now = dict(login)  # in force
        self.session = dict(login)  # kept when the transaction commits
        self.start = dict(login)  # the session's at the transaction's start
        self.marks: list[tuple[str, dict[str, str], dict[str, str]]] = []  # savepoints
        self.block = False  # in a transaction block (BEGIN)
        self.touched: set[str] = set()  # set since the current request began
        self.changed = False  # an operation applied since the last transaction's end

    def apply(self, op: SettingOp) -> None:
        self.changed = True
        kind, setting, value = op
        if kind == "set" or kind == "local":
            if value == DEFAULT:
                value = self.login[setting]
            self.now[setting] = value
            if kind == "set":
                self.session[setting] = value
            self.touched.add(setting)
        elif kind == "reset_all":
            self.now.update(self.login)
            self.session.update(self.login)
            self.touched.update(_PARAMETERS)
        elif kind == "begin":
            self.block = True
        elif kind == "commit":
            self.end(commit=True)
        elif kind == "rollback":
            self.end(commit=False)
        elif kind == "savepoint":
            if self.block:
                self.marks.append((setting, dict(self.now), dict(self.session)))
        elif kind == "release" or kind == "rollback_to":
            for i in range(len(self.marks) - 1, -1, -1):
                if self.marks[i][0] == setting:
                    if kind == "rollback_to":
                        _, now, session = self.marks[i]
                        self.now, self.session = dict(now), dict(session)
                        self.touched.update(_PARAMETERS)
                        del self.marks[i + 1 :]
                    else:
                        del self.marks[i:]
                    break

    def end(self, commit: bool) -> bool:
        """The transaction ends (an implicit one at its request's end, if it succeeds);
        whether that changed the values in force."""
        if not self.changed and not self.block:
            return False  # the common case: nothing was set
        self.changed = False
        if not commit and self.session != self.start:
            self.session = dict(self.start)
        changed = self.now != self.session
        if changed:
            self.now = dict(self.session)
            self.touched.update(_PARAMETERS)
        if self.start != self.session:
            self.start = dict(self.session)
        if self.marks:
            self.marks = []
        self.block = False
        return changed

    def confirm(self, truth: dict[str, str], block: bool) -> bool:
        """The server's values at the start of the current request: what was not set since
        is theirs. Whether that changed the values in force."""
        if self.now == truth and self.block == block and not self.marks:
            return False  # the common case: as predicted
        self.changed = True
        changed = False
        for setting in _PARAMETERS:
            value = truth[setting]
            if setting in self.touched or self.now[setting] == value:
                continue
            if not block or self.session[setting] == self.now[setting]:
                self.session[setting] = value
            self.now[setting] = value
            changed = True
        if not block and self.start != self.session:
            self.start = dict(self.session)
        if not block and self.marks:
            self.marks = []
        self.block = block
        return changed


_IDLE = ord("I")  # ReadyForQuery's status outside a transaction block


# compiled (mypyc), a class Python code may subclass must say so: a test subclasses this one
# (tests/unit/test_reading_tracker_cache.py: the tracker before its shortcuts)
@mypyc_attr(allow_interpreted_subclasses=True)
class ReadingTracker:
    """Predicts the `Reading` of each message a session's client sends (see the module
    docstring). The statement log tells it what is sent and what the server answers."""

    def __init__(self, reported: dict[str, str]) -> None:
        login = {s: canonical(s, reported.get(s, "")) for s in _PARAMETERS}
        if not login[CLIENT_ENCODING]:
            login[CLIENT_ENCODING] = "UTF8" if CLIENT_ENCODING not in reported else ""
        if not login[CONFORMING]:
            login[CONFORMING] = "on" if CONFORMING not in reported else ""
        server = reported.get("server_encoding", "UTF8")
        self.server_encoding = canonical(CLIENT_ENCODING, server) or server
        self.truth = dict(login)  # as the server last reported them
        self._values = _Values(login)
        self._base = self._reading(login)  # at the start of the client's current request
        self.base_exact = True  # ... and that is what the server had then
        # the settings that code run since the current request began may have changed
        # unseen (a SET of one since makes it known again)
        self.unsure: set[str] = set()
        self._now: Reading | None = self._base
        self._server: Reading | None = self._base
        self._codec: str | None = None  # see codec(); None when _now or _server changed

    def _reading(self, values: dict[str, str]) -> Reading:
        return Reading(
            values[CLIENT_ENCODING], _BOOLEAN.get(values[CONFORMING]), self.server_encoding
        )

    def now(self) -> Reading:
        """What the next message will be read under, as predicted."""
        if self._now is None:
            self._now = self._reading(self._values.now)
        return self._now

    @property
    def base(self) -> Reading:
        """What the current request began under, as predicted."""
        return self._base

    def settled(self, sensitive: int) -> bool:
        """Whether the settings a text of this sensitivity reads by follow from what the
        current request began under: no code since may have changed them unseen."""
        unsure = self.unsure
        if not unsure:
            return True
        if sensitive & ENCODING and CLIENT_ENCODING in unsure:
            return False
        return not (sensitive & BACKSLASH and CONFORMING in unsure)

    def _apply(self, ops: tuple[SettingOp, ...]) -> None:
        for op in ops:
            kind = op[0]
            if kind == "code":
                self.unsure.update(_PARAMETERS)
                continue
            if kind == "set" or kind == "local":
                self.unsure.discard(op[1])
            elif kind == "reset_all":
                self.unsure.clear()
            self._values.apply(op)
            self._now = self._codec = None

    def query(self, ops: tuple[SettingOp, ...] | None) -> None:
        """A Query, read now; its statements run (an unknown statement: as if it changed
        nothing, which the server's report checks), and its request ends."""
        if ops and ops != _JUST_CODE:  # (code matters within a request only)
            self._apply(ops)
        self._request_ends()

    def bind(self, ops: tuple[SettingOp, ...] | None) -> None:
        """A Bind of a statement whose operations are `ops` (None: not known). Binding may
        run code (a parameter's input, the planner), unless the statement runs none. (A
        Parse, Describe or Close runs none.)"""
        if ops is None or CODE in ops:
            self.unsure.update(_PARAMETERS)

    def execute(self, ops: tuple[SettingOp, ...] | None) -> None:
        """An Execute of a statement whose operations are `ops` (None: not known)."""
        if ops is None or ops == _JUST_CODE:  # (the common case: code, nothing set)
            self.unsure.update(_PARAMETERS)
        elif ops:
            self._apply(ops)

    def sync(self) -> None:
        self._request_ends()

    def function_call(self) -> None:
        """A FunctionCall: code runs; the server's report checks the next request."""
        self._request_ends()

    def _request_ends(self) -> None:
        values = self._values
        # (end() has nothing to do while nothing was set: the common case, not called)
        if not values.block and values.changed and values.end(commit=True):
            self._now = self._codec = None
        if values.touched:
            values.touched.clear()
        now = self._now  # (now(), inlined: run for every request)
        self._base = now if now is not None else self.now()
        self.base_exact = False
        if self.unsure:
            self.unsure.clear()

    def reported(self, name: str, value: str) -> None:
        """A ParameterStatus."""
        if name in self.truth:
            self.truth[name] = canonical(name, value)
            self._server = self._codec = None

    def codec(self) -> str:
        """The Python codec text keys in rows and parameters are read in: the client
        encoding, when the server's last report and the prediction agree on it; else ""
        (keys in text then read as nothing: subjects are not complete)."""
        codec = self._codec
        if codec is None:
            now = self.now().client_encoding
            codec = python_codec(now) if now == self.server.client_encoding else ""
            self._codec = codec
        return codec

    @property
    def server(self) -> Reading:
        """What the server last reported."""
        if self._server is None:
            self._server = self._reading(self.truth)
        return self._server

    def confirm(self, tx_status: int) -> None:
        """The server answered every request but the client's current one: what it last
        reported is what that request began under."""
        values = self._values
        block = tx_status != _IDLE
        # (_Values.confirm's own first test, inlined: as predicted, the common case)
        if (values.now != self.truth or values.block != block or values.marks) and values.confirm(
            self.truth, block
        ):
            self._now = self._codec = None
        server = self._server  # (server, inlined: run for every request)
        self._base = server if server is not None else self.server
        self.base_exact = True
