"""The analyser's answer for one statement text: `Decision` (pass, rewrite or refuse, and what
the audit and the session learn of the statement), and the two ways a decision is copied
with changes: `with_audit_text` (the statement as an audit event shows it) and `evolve` (the
shape cache's fast copy).

Pure data: no I/O, no analysis. A decision never holds a literal of the statement outside
`sql` (the text to send), `subject_keys` (which go to the audit stream only) and `shaped`
(the literals again, for the text prepared from them: rules/prepare.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from audit.redaction import fingerprint, redact
from rules.effects import Effects
from rules.settings import SettingOp
from rules.subjects import SubjectKeys

NOT_PARSED = "pgveil cannot parse the statement"


@dataclass(frozen=True)
class Decision:
    action: str  # "pass" (send as is), "rewrite" (send `sql`), "refuse"
    sql: str | None = None
    reason: str | None = None
    kinds: tuple[str, ...] = ()  # select, insert, update, delete, copy, ...
    tables: tuple[str, ...] = ()  # protected relations the statement reads or writes
    columns: tuple[str, ...] = ()  # personal columns read, masked (table.column)
    # those of them that are `deny` (read as NULL; or written, which only NULL may be):
    # the audit lists them as denied, not masked; also on a refusal
    denied: tuple[str, ...] = ()
    uses_hash: bool = False
    # relations the catalog does not know (created since it was read), and temporary
    # relations the statement creates: the session judges those against its own
    unknown_relations: tuple[str, ...] = ()
    temp_relations: tuple[str, ...] = ()
    # data subjects named by the statement itself, where its shape proves that it touches
    # no other (rules.subjects): a write's or a one-table read's `subject = k` /
    # `subject IN (...)` (top-level AND), or an INSERT's VALUES. A key is normalised by
    # the key column's type, or the parameter that carries it.
    subject_keys: tuple[SubjectKeys, ...] = ()
    # tables whose subjects the keys in the rows returned prove (rules.subjects)
    row_subjects: tuple[str, ...] = ()
    # What each statement does to the session's names and transaction, for the statement log
    # (proxy/session/statements.py): one tuple of effects per statement, in order, or () when
    # no statement has any; None when they cannot be known (the text does not parse as the
    # server parses it: an unmasked session's statement that still runs)
    effects: Effects | None = ()
    # the names EXECUTE / FETCH use ("statement:NAME", "portal:NAME"), for the decision made
    # before the statement is sent
    uses: tuple[str, ...] = ()
    # the cursors MOVE positions ("portal:NAME"): it reads no rows but counts them, so a
    # masked session checks what they run as it checks a FETCH's (no access of its own for
    # the audit)
    moves: tuple[str, ...] = ()
    # the statement as audit events show it (see audit.redaction.redact), and its hash:
    # filled in by the shape cache (rules.shapes), once per statement shape
    redacted: str = ""
    fingerprint: str = ""
    # what the statements do to the settings that decide how the server reads later
    # messages (rules.settings), in order; None when the text does not parse as the
    # server's does
    settings: tuple[SettingOp, ...] | None = ()
    # the audit: the views the statement reads, each with the protected tables behind it
    # (which `tables` holds too); every relation name it reads or names, as written
    # ("name", "schema.name"); the views it creates ("schema.name", "name" as written, or
    # "pg_temp.name" for a temporary one), each with the protected tables its query reads
    views: tuple[tuple[str, tuple[str, ...]], ...] = ()
    relations: tuple[str, ...] = ()
    defines: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # a refusal made once the analysis had gone through the whole statement: `tables` are
    # all it reads (a view a masked role may not read, say)
    complete: bool = False
    # whether it may make names denote other relations or functions than the catalog says:
    # it creates or replaces a view that is not temporary or a function, renames or moves
    # a function, renames, moves, alters, drops or rewrites (CREATE RULE) a relation the
    # catalog has, or renames or drops a schema; or it attaches code the server runs
    # unnamed (a trigger, policy or index of a relation the catalog has; a cast, operator,
    # type or domain), which the catalog read must see (rules.subjects); or it runs code
    # pgveil does not see into that may do any of that (rules.code: a DO block, or a
    # procedure, function, view, trigger... that may run DDL; not one that only reads and
    # writes rows)
    moves_names: bool = False
    # the system relations and functions read that show values or statement text
    # (rules.denied.SYSTEM_VIEWS): rewritten for masked roles; an unmasked session reads
    # them raw, and its event cannot name the tables whose values they show
    exposes: tuple[str, ...] = ()
    # the text does not parse with pgveil's parser (a refusal): the masked filter lets the
    # server's raw parser answer it with its own syntax error, in a form that cannot run
    # (proxy/session/masked.py: the syntax probe)
    syntax: bool = False
    # a rewrite made from its shape's analysis (rules/shapes.py): that shape's cache entry
    # and the statement's literals, from which its prepared form is made when a session
    # asks for it (rules/prepare.py, shapes.prepared_form); None otherwise
    shaped: tuple[Any, Sequence[str]] | None = field(default=None, compare=False)


def with_audit_text(d: Decision, analysed: str) -> Decision:
    """`d` with the redacted text of the statement it was made for, and its fingerprint."""
    text = redact(analysed, names=not d.syntax)
    return dataclasses.replace(d, redacted=text, fingerprint=fingerprint(text))


def evolve(d: Decision, changes: dict[str, Any]) -> Decision:
    """`dataclasses.replace` for the hot path: a copy of the frozen decision's attributes,
    without running __init__ (several times faster; no field here has a post-init)."""
    new: Decision = object.__new__(Decision)
    attributes = new.__dict__
    attributes.update(d.__dict__)
    attributes.update(changes)
    return new
