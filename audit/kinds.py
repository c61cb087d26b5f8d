"""What the statement kinds of access events mean to a reader of `pgveil audit who`.

An access event's `kinds` are the analyser's names for its statements (rules/analyzer.py:
`select`, `copy`, `set`, ... and, for a statement class it has no name for, the parser's
class name such as `DoStmt`), or the recorder's for what it could not analyse (`query`,
`execute`, `call`, `function_call`, `unknown`, `notification`).

Two things are decided here, from the event alone:

* `cannot_carry_data`: whether every statement of the event is of a kind that can neither
  return nor change a subject's data (a setting, maintenance, transaction control, a name
  dropped). An ALLOW-LIST: a kind not on it (a new one, `DO`, `CALL`, a function call, a
  statement pgveil could not read) is always listed by `who`. The event's kinds must be
  what the server ran: an event whose text or names pgveil could not read for sure
  (`uncertain` not one of `KINDS_KNOWN`) is listed whatever its kinds, and so is one whose
  error or notice may carry values (a deferred constraint's key at COMMIT, a NOTICE raised
  by an index expression while VACUUM runs).
* `readable`: a kind as a person reads it (`copy out`, `do block`), never a class name.

Pure: no I/O. Nothing here reads a statement's text but the keywords of a redacted one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# The analyser's kinds (and parser class names) of statements that can neither return
# nor change a subject's data, whatever they name: SET / RESET (also SET ROLE, SET
# TRANSACTION: the values are constants), SHOW, transaction control, VACUUM and ANALYZE
# (statistics are read through pg_stats, which is an access of its own), CHECKPOINT,
# REINDEX, CLUSTER, DISCARD, LISTEN / UNLISTEN, DEALLOCATE, CLOSE, LOCK. Code a table runs
# on them (an index expression's function, a deferred trigger at COMMIT) is not seen: what
# it shows of data comes in a message, and such an event is kept (`values_in_messages`).
# tests/unit/test_audit_kinds.py walks every statement class of the parser against this.
CANNOT_CARRY_DATA = frozenset(
    {
        "set", "show", "transaction", "vacuum", "analyze",
        "CheckPointStmt", "ReindexStmt", "ClusterStmt", "DiscardStmt", "ListenStmt",
        "UnlistenStmt", "DeallocateStmt", "ClosePortalStmt", "LockStmt",
    }
)  # fmt: skip

# The start of an event's `uncertain` reason when its kinds are still those the server ran:
# the analysis stopped at a statement it does not follow (every statement's kind is known
# before the walk), or a statement names something the catalog pgveil read does not have.
ANALYSIS_STOPPED = "not analysed to its end: "
UNKNOWN_NAMES = "names something the catalog pgveil read does not have"
KINDS_KNOWN = (ANALYSIS_STOPPED, UNKNOWN_NAMES)
# reasons whose kinds may not be what the server ran (the recorder's own)
NOT_READ = "what it ran cannot be told for sure (its text or a name it uses)"
FUNCTION_CALL = "a FunctionCall message (code pgveil does not see into)"
UNREADABLE = "text not readable in the client encoding"
RAW_STATISTICS = "reads statistics or activity views raw (values of any table)"


def cannot_carry_data(e: Mapping[str, Any]) -> bool:
    """Whether the access event `e` is of statements that can neither return nor change a
    subject's data (see the module docstring): `who` does not list it."""
    kinds = e.get("kinds")
    if not isinstance(kinds, list) or not kinds:
        return False
    if not all(isinstance(k, str) and k in CANNOT_CARRY_DATA for k in kinds):
        return False
    if e.get("values_in_messages") is True:
        return False
    if e.get("analysis_complete") is False:
        reason = e.get("uncertain")
        return isinstance(reason, str) and reason.startswith(KINDS_KNOWN)
    return True


# kinds as a person reads them (the analyser's names and the parser's class names)
_READABLE = {
    "select": "select", "insert": "insert", "update": "update", "delete": "delete",
    "explain": "explain", "prepare": "prepare", "execute": "execute",
    "declare": "declare cursor", "fetch": "fetch from cursor",
    "create_table_as": "create table as", "create_view": "create view", "set": "set",
    "show": "show", "transaction": "transaction control", "call": "call", "vacuum": "vacuum",
    "analyze": "analyze", "notification": "notification", "function_call": "function call",
    "query": "query (not analysed)", "unknown": "statement (not analysed)",
    "DoStmt": "do block", "CheckPointStmt": "checkpoint", "ClosePortalStmt": "close cursor",
    "CreateStmt": "create table", "IndexStmt": "create index", "CreatedbStmt": "create database",
    "DropdbStmt": "drop database", "DefineStmt": "create aggregate/operator/type",
    "CreateTrigStmt": "create trigger", "CreatePLangStmt": "create language",
    "CreateSeqStmt": "create sequence", "AlterSeqStmt": "alter sequence",
    "RenameStmt": "rename", "GrantStmt": "grant/revoke", "GrantRoleStmt": "grant/revoke role",
    "RuleStmt": "create rule", "ReturnStmt": "return", "PLAssignStmt": "pl/pgsql assignment",
    "CopyStmt": "copy", "VariableSetStmt": "set", "VariableShowStmt": "show",
    "TransactionStmt": "transaction control", "CallStmt": "call",
    "SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update",
    "DeleteStmt": "delete", "ExplainStmt": "explain", "PrepareStmt": "prepare",
    "ExecuteStmt": "execute", "DeclareCursorStmt": "declare cursor", "FetchStmt":
    "fetch from cursor", "CreateTableAsStmt": "create table as", "ViewStmt": "create view",
    "VacuumStmt": "vacuum", "CommentStmt": "comment", "ReplicaIdentityStmt":
    "alter table replica identity", "AlterTSConfigurationStmt":
    "alter text search configuration", "AlterTSDictionaryStmt": "alter text search dictionary",
}  # fmt: skip
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z][a-z]*|[a-z]+")


def readable(kind: str) -> str:
    """A kind as a person reads it: `do block`, `alter table`, never `DoStmt`."""
    found = _READABLE.get(kind)
    if found is not None:
        return found
    if kind.endswith("Stmt"):
        words = _WORD.findall(kind[: -len("Stmt")])
        return " ".join(w.lower() for w in words) or "statement"
    return kind.replace("_", " ")


def what(kinds: Iterable[str], statement: object = None) -> list[str]:
    """The readable kinds of an event's statements; a COPY as `copy out` or `copy in`, told
    from the redacted statement's keywords (`copy` when they do not tell)."""
    directions = _copy_directions(statement) if isinstance(statement, str) else []
    out: list[str] = []
    copies = 0
    for kind in kinds:
        name = readable(kind)
        if kind == "copy":
            direction = directions[copies] if copies < len(directions) else None
            copies += 1
            if direction is not None:
                name = f"copy {direction}"
        out.append(name)
    return out


_TOKEN = re.compile(r'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'|[A-Za-z_][A-Za-z_0-9$]*|[();]')


def _copy_directions(text: str) -> list[str | None]:
    """For each COPY in a redacted statement text (tokens separated by spaces, literals
    replaced by `?`), `out` (TO) or `in` (FROM): the first TO or FROM outside parentheses
    after the COPY keyword. None when not found."""
    out: list[str | None] = []
    depth = 0
    state = None  # None: not in a COPY; "open": looking for TO/FROM
    for token in _TOKEN.findall(text):
        if token == "(":
            depth += 1
        elif token == ")":
            depth = max(0, depth - 1)
        elif token == ";" and depth == 0:
            if state == "open":
                out.append(None)
            state = None
        elif depth == 0:
            word = token.upper()
            if state is None and word == "COPY":
                state = "open"
            elif state == "open" and word in ("TO", "FROM"):
                out.append("out" if word == "TO" else "in")
                state = "done"
    if state == "open":
        out.append(None)
    return out
