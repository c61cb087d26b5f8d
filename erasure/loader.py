"""Reads an erasure configuration file (`erasure.yaml`) into an `ErasureConfig`, strictly.

Every error names the file, the line, the key path and what to write instead: an unknown
key, a missing key, a bad duration or interval, a relation that cannot resolve (a table
that goes through a table that is not configured, or a cycle). What needs the database
(do the tables and columns exist, are the batch keys indexed) is checked by
`erasure.catalog.check` against the live catalog. This module reads the file it is given
and nothing else; it holds no personal values (placeholders are operator-chosen text).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from erasure.model import (
    VACUUM_MODES,
    AuditSettings,
    AuditTable,
    ColumnAction,
    ErasureConfig,
    Owner,
    Retention,
    SubjectSpec,
    TableName,
    TableSpec,
    VacuumMode,
    WorkerSettings,
)
from shared import user_files
from shared.strict_yaml import NULL_TAG, StrictYaml

TOP_KEYS = ("subject", "tables", "worker", "audit")
SUBJECT_KEYS = ("table", "key", "terminated_at", "retention")
RETENTION_KEYS = ("default", "by_class", "class_table")
BY_CLASS_KEYS = ("column", "values")
CLASS_TABLE_KEYS = ("table", "key", "column", "subject_column")
TABLE_KEYS = ("owner", "columns", "action", "large", "key", "batch_size")
OWNER_KEYS = ("column", "through", "key")
COLUMN_KEYS = ("placeholder", "json_keys")
WORKER_KEYS = (
    "poll_interval",
    "batch_size",
    "lock_timeout",
    "statement_timeout",
    "rate_limit",
    "retries",
    "max_failures",
    "concurrency",
    "vacuum",
)
AUDIT_KEYS = ("file", "stdout", "table")
AUDIT_TABLE_KEYS = ("dsn", "name", "chain")

_DURATION = re.compile(r"(\d+)\s*(ms|s|min|h)")
_DURATION_MS = {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000}
_INTERVAL_UNITS = "years?|months?|weeks?|days?|hours?|minutes?"
_INTERVAL = re.compile(rf"\s*(\d+\s*({_INTERVAL_UNITS})\s*)+")


class ErasureConfigError(Exception):
    """An erasure configuration is invalid; the message is safe to print and says the fix."""


class _Ctx(StrictYaml):
    error = ErasureConfigError
    EXPECTED_MAPPING = "expected a mapping (key: value)"
    DUPLICATE_KEY = "duplicate key; give each key once"
    NULL_IS_A_VALUE = False
    KEY_LINES = True

    def require(self, given: dict[str, yaml.Node], node: yaml.Node, path: str, key: str) -> None:
        if key not in given:
            raise self.fail(node, path, f"missing '{key}'")

    def name(self, node: yaml.Node, path: str) -> str:
        text = self.scalar(node, path)
        if not text or "\0" in text:
            raise self.fail(node, path, "expected a column name")
        return text

    def table_name(self, node: yaml.Node | None, path: str, text: str) -> TableName:
        schema, _, name = text.rpartition(".")
        if not schema or not name:
            raise self.fail(node, path, f"'{text}': write the table as schema.table")
        return TableName(schema, name)

    def boolean(self, node: yaml.Node, path: str) -> bool:
        text = self.scalar(node, path)
        if text not in ("true", "false"):
            raise self.fail(node, path, "expected true or false")
        return text == "true"

    def duration_ms(self, node: yaml.Node, path: str, lo_ms: int, hi_ms: int) -> int:
        text = self.scalar(node, path).strip()
        m = _DURATION.fullmatch(text)
        if m is None:
            raise self.fail(
                node, path, f"'{text}' is not a duration; write e.g. 500ms, 5s, 2min, 1h"
            )
        ms = int(m.group(1)) * _DURATION_MS[m.group(2)]
        if not lo_ms <= ms <= hi_ms:
            raise self.fail(node, path, f"expected from {lo_ms} ms to {hi_ms // 1000} s")
        return ms

    def interval(self, node: yaml.Node, path: str) -> str:
        """A retention period: whole days (`30`) or interval text (`30 days`, `1 year 6 months`)."""
        text = self.scalar(node, path).strip()
        if re.fullmatch(r"\d+", text):
            return f"{int(text)} days"
        if _INTERVAL.fullmatch(text) is None:
            raise self.fail(
                node,
                path,
                f"'{text}' is not a retention period; write whole days (30) or e.g. "
                "'30 days', '6 months', '1 year 2 months'",
            )
        return " ".join(text.split())


def load_config(path: Path) -> ErasureConfig:
    try:
        text = user_files.read_text(path, "the erasure configuration")
    except user_files.UnreadableFile as exc:
        raise ErasureConfigError(str(exc)) from exc
    return parse_config(text, str(path))


def parse_config(text: str, source: str = "<erasure>") -> ErasureConfig:
    ctx = _Ctx(source)
    root = ctx.compose(text)
    if root is None:
        raise ErasureConfigError(f"{source}: the file is empty; it needs 'subject' and 'tables'")
    top = ctx.mapping(root, "", TOP_KEYS)
    for key in ("subject", "tables", "audit"):
        if key not in top:
            raise ctx.fail(root, "", _MISSING_TOP[key])
    subject = _subject(ctx, top["subject"])
    tables = _tables(ctx, top["tables"], subject)
    worker = _worker(ctx, top["worker"]) if "worker" in top else WorkerSettings()
    audit = _audit(ctx, top["audit"])
    return ErasureConfig(
        source=source,
        subject=subject,
        tables=tables,
        worker=worker,
        audit=audit,
        version=hashlib.sha256(text.encode()).hexdigest()[:16],
        lines=dict(ctx.lines),
    )


_MISSING_TOP = {
    "subject": "missing 'subject': the table of the data subjects (e.g. billing.customers), "
    "its key and its termination column",
    "tables": "missing 'tables': which tables hold the subjects' personal data and what to do",
    "audit": "missing 'audit': every erasure is audited; give audit.file: PATH and/or "
    "audit.stdout: true",
}


def _subject(ctx: _Ctx, node: yaml.Node) -> SubjectSpec:
    given = ctx.mapping(node, "subject", SUBJECT_KEYS)
    for key in ("table", "key", "terminated_at"):
        ctx.require(given, node, "subject", key)
    table = ctx.table_name(
        given["table"], "subject.table", ctx.scalar(given["table"], "subject.table")
    )
    retention = _retention(ctx, given["retention"]) if "retention" in given else Retention("0 days")
    return SubjectSpec(
        table=table,
        key=ctx.name(given["key"], "subject.key"),
        terminated_at=ctx.name(given["terminated_at"], "subject.terminated_at"),
        retention=retention,
    )


def _retention(ctx: _Ctx, node: yaml.Node) -> Retention:
    path = "subject.retention"
    if isinstance(node, yaml.ScalarNode):
        return Retention(ctx.interval(node, path))
    given = ctx.mapping(node, path, RETENTION_KEYS)
    if "by_class" in given and "class_table" in given:
        raise ctx.fail(node, path, "give either 'by_class' or 'class_table', not both")
    default = ctx.interval(given["default"], f"{path}.default") if "default" in given else "0 days"
    if "by_class" in given:
        bnode = given["by_class"]
        b = ctx.mapping(bnode, f"{path}.by_class", BY_CLASS_KEYS)
        for key in BY_CLASS_KEYS:
            ctx.require(b, bnode, f"{path}.by_class", key)
        values = ctx.mapping(b["values"], f"{path}.by_class.values")
        if not values:
            raise ctx.fail(b["values"], f"{path}.by_class.values", "map class values to periods")
        return Retention(
            default=default,
            by_class_column=ctx.name(b["column"], f"{path}.by_class.column"),
            by_class=tuple(
                (cls, ctx.interval(v, f"{path}.by_class.values.{cls}")) for cls, v in values.items()
            ),
        )
    if "class_table" in given:
        cnode = given["class_table"]
        c = ctx.mapping(cnode, f"{path}.class_table", CLASS_TABLE_KEYS)
        for key in ("table", "key", "column"):
            ctx.require(c, cnode, f"{path}.class_table", key)
        tpath = f"{path}.class_table.table"
        class_key = ctx.name(c["key"], f"{path}.class_table.key")
        return Retention(
            default=default,
            class_table=ctx.table_name(c["table"], tpath, ctx.scalar(c["table"], tpath)),
            class_key=class_key,
            class_subject_column=(
                ctx.name(c["subject_column"], f"{path}.class_table.subject_column")
                if "subject_column" in c
                else class_key
            ),
            class_column=ctx.name(c["column"], f"{path}.class_table.column"),
        )
    return Retention(default)


def _tables(ctx: _Ctx, node: yaml.Node, subject: SubjectSpec) -> tuple[TableSpec, ...]:
    entries = ctx.mapping(node, "tables")
    if not entries:
        raise ctx.fail(node, "tables", "list at least one table")
    specs: list[TableSpec] = []
    for qname, tnode in entries.items():
        path = f"tables.{qname}"
        table = ctx.table_name(tnode, path, qname)
        specs.append(_table(ctx, tnode, path, table, subject))
    by_name = {s.table: s for s in specs}
    for s in specs:
        _resolve(ctx, s, by_name)
    _reserved(ctx, specs, subject)
    return tuple(specs)


def _table(
    ctx: _Ctx, node: yaml.Node, path: str, table: TableName, subject: SubjectSpec
) -> TableSpec:
    given = ctx.mapping(node, path, TABLE_KEYS)
    is_subject = table == subject.table
    action = ctx.scalar(given["action"], f"{path}.action") if "action" in given else "update"
    if action not in ("update", "delete"):
        raise ctx.fail(
            given["action"], f"{path}.action", "expected 'update' (set columns) or 'delete'"
        )
    owner: Owner | None = None
    if is_subject:
        if "owner" in given:
            raise ctx.fail(
                given["owner"],
                f"{path}.owner",
                "the subject table's rows are found by subject.key; remove 'owner'",
            )
        if action == "delete":
            raise ctx.fail(
                given["action"],
                f"{path}.action",
                "the subject's own record stays (billing history); set its columns instead",
            )
    else:
        if "owner" not in given:
            raise ctx.fail(
                node,
                path,
                "missing 'owner': how rows belong to a subject, e.g. owner: {column: "
                f"{subject.key}}} or owner: {{column: i_account, through: schema.accounts}}",
            )
        owner = _owner(ctx, given["owner"], f"{path}.owner", subject)
    columns: tuple[ColumnAction, ...] = ()
    if action == "delete":
        if "columns" in given:
            raise ctx.fail(
                given["columns"], f"{path}.columns", "deleted rows need no columns; remove them"
            )
    else:
        if "columns" not in given:
            raise ctx.fail(
                node, path, "missing 'columns': which columns to erase (or action: delete)"
            )
        cols = ctx.mapping(given["columns"], f"{path}.columns")
        if not cols:
            raise ctx.fail(given["columns"], f"{path}.columns", "name at least one column")
        columns = tuple(_column(ctx, v, f"{path}.columns.{c}", c) for c, v in cols.items())
    large = ctx.boolean(given["large"], f"{path}.large") if "large" in given else False
    key = ctx.name(given["key"], f"{path}.key") if "key" in given else None
    if is_subject:
        if key is not None and key != subject.key:
            raise ctx.fail(
                given["key"],
                f"{path}.key",
                f"the subject table's key is subject.key ({subject.key}); remove 'key'",
            )
        key = subject.key
        if large:
            raise ctx.fail(
                given["large"],
                f"{path}.large",
                "the subject table has one row per subject; remove 'large'",
            )
    batch_size = (
        ctx.integer(given["batch_size"], f"{path}.batch_size", 1, 1_000_000)
        if "batch_size" in given
        else None
    )
    if large and key is None:
        raise ctx.fail(
            node,
            path,
            "a large table is erased in batches by an indexed key: add 'key' "
            "(e.g. key: i_xdr, with an index on (owner column, key))",
        )
    if batch_size is not None and not large:
        raise ctx.fail(
            given["batch_size"],
            f"{path}.batch_size",
            "batches are for large tables: add large: true (and key), or remove batch_size",
        )
    if owner is not None and key is not None and key == owner.column:
        raise ctx.fail(
            given["key"],
            f"{path}.key",
            "the key must differ from owner.column: use a key "
            "that orders the rows of one owner (e.g. the primary key)",
        )
    for c in columns:
        if c.uses_key and key is None:
            raise ctx.fail(
                given["columns"],
                f"{path}.columns.{c.column}.placeholder",
                "'{key}' needs the table's key: add 'key' to the table",
            )
    return TableSpec(
        table, owner, "delete" if action == "delete" else "update", columns, large, key, batch_size
    )


def _owner(ctx: _Ctx, node: yaml.Node, path: str, subject: SubjectSpec) -> Owner:
    given = ctx.mapping(node, path, OWNER_KEYS)
    ctx.require(given, node, path, "column")
    column = ctx.name(given["column"], f"{path}.column")
    through: TableName | None = None
    if "through" in given:
        through = ctx.table_name(
            given["through"], f"{path}.through", ctx.scalar(given["through"], f"{path}.through")
        )
        if through == subject.table:
            through = None
    if "key" in given:
        key = ctx.name(given["key"], f"{path}.key")
        if through is None and key != subject.key:
            raise ctx.fail(
                given["key"],
                f"{path}.key",
                f"rows owned directly by the subject match subject.key ({subject.key}); "
                "remove 'key' or add 'through'",
            )
    else:
        key = subject.key if through is None else column
    return Owner(column, through, key)


def _column(ctx: _Ctx, node: yaml.Node, path: str, column: str) -> ColumnAction:
    if isinstance(node, yaml.ScalarNode) and (node.tag == NULL_TAG or node.value == "null"):
        return ColumnAction(column, "null")
    hint = (
        "expected null, {placeholder: TEXT}, or {json_keys: [KEY, a.b]} "
        "(with an optional placeholder for the keys)"
    )
    if not isinstance(node, yaml.MappingNode):
        raise ctx.fail(node, path, hint)
    given = ctx.mapping(node, path, COLUMN_KEYS)
    if not given:
        raise ctx.fail(node, path, hint)
    placeholder = (
        ctx.scalar(given["placeholder"], f"{path}.placeholder") if "placeholder" in given else None
    )
    if "json_keys" not in given:
        return ColumnAction(column, "placeholder", placeholder)
    jnode = given["json_keys"]
    if not isinstance(jnode, yaml.SequenceNode) or not jnode.value:
        raise ctx.fail(
            jnode, f"{path}.json_keys", "expected a list of keys, e.g. [dl, address.street]"
        )
    paths: list[tuple[str, ...]] = []
    for i, item in enumerate(jnode.value):
        text = ctx.scalar(item, f"{path}.json_keys[{i}]")
        parts = tuple(text.split("."))
        if any(not p for p in parts):
            raise ctx.fail(
                item,
                f"{path}.json_keys[{i}]",
                "expected a key or a dotted path, e.g. address.street",
            )
        if parts in paths:
            raise ctx.fail(item, f"{path}.json_keys[{i}]", f"'{text}' is listed twice")
        paths.append(parts)
    if placeholder is None:
        return ColumnAction(column, "json_remove", None, tuple(paths))
    return ColumnAction(column, "json_placeholder", placeholder, tuple(paths))


def _resolve(ctx: _Ctx, spec: TableSpec, by_name: dict[TableName, TableSpec]) -> None:
    """Every `through` chain must end at the subject table, through configured tables."""
    seen = [spec.table]
    current = spec
    while current.owner is not None and current.owner.through is not None:
        nxt = by_name.get(current.owner.through)
        if nxt is None:
            raise ctx.fail_at(
                f"{current.path}.owner.through",
                f"{current.owner.through} is not configured under 'tables': add it (with its "
                "own owner) so the relation resolves to the subject",
            )
        if nxt.table in seen:
            chain = " -> ".join(str(t) for t in [*seen, nxt.table])
            raise ctx.fail_at(f"{spec.path}.owner.through", f"the relation loops: {chain}")
        if nxt.action == "delete":
            raise ctx.fail_at(
                f"{current.path}.owner.through",
                f"{nxt.table} is deleted, so rows could not be found through it afterwards; "
                "set its columns instead of deleting its rows",
            )
        seen.append(nxt.table)
        current = nxt


def _reserved(ctx: _Ctx, specs: list[TableSpec], subject: SubjectSpec) -> None:
    """Columns that find rows (keys, owner columns, termination, class) are never erased:
    erasing them would lose track of rows still to do, and they identify no one once the
    rows they point to are erased."""
    reasons: dict[tuple[TableName, str], str] = {
        (subject.table, subject.key): "it is subject.key",
        (subject.table, subject.terminated_at): "it is subject.terminated_at",
    }
    r = subject.retention
    for col in (r.by_class_column, r.class_subject_column):
        if col is not None:
            reasons[(subject.table, col)] = "it finds the retention period"
    for s in specs:
        if s.key is not None:
            reasons.setdefault((s.table, s.key), "it is the table's key")
        if s.owner is not None:
            reasons.setdefault((s.table, s.owner.column), "it is owner.column")
            parent = s.owner.through or subject.table
            reasons.setdefault((parent, s.owner.key), f"{s.table} is found through it")
    for s in specs:
        for c in s.columns:
            why = reasons.get((s.table, c.column))
            if why is not None:
                raise ctx.fail_at(
                    f"{s.path}.columns.{c.column}",
                    f"{c.column} cannot be erased: {why}, and rows are found by it; remove it "
                    "(it identifies no one once the rows it points to are erased)",
                )


def _worker(ctx: _Ctx, node: yaml.Node) -> WorkerSettings:
    given = ctx.mapping(node, "worker", WORKER_KEYS)
    d = WorkerSettings()

    def num(key: str, lo: int, hi: int, default: int) -> int:
        return ctx.integer(given[key], f"worker.{key}", lo, hi) if key in given else default

    def dur(key: str, lo: int, hi: int, default: int) -> int:
        return ctx.duration_ms(given[key], f"worker.{key}", lo, hi) if key in given else default

    return WorkerSettings(
        poll_interval_s=dur("poll_interval", 100, 86_400_000, int(d.poll_interval_s * 1000)) / 1000,
        batch_size=num("batch_size", 1, 1_000_000, d.batch_size),
        lock_timeout_ms=dur("lock_timeout", 1, 3_600_000, d.lock_timeout_ms),
        statement_timeout_ms=dur("statement_timeout", 1, 86_400_000, d.statement_timeout_ms),
        rate_limit=num("rate_limit", 0, 100_000_000, d.rate_limit),
        retries=num("retries", 0, 100, d.retries),
        max_failures=num("max_failures", 1, 1000, d.max_failures),
        concurrency=num("concurrency", 1, 64, d.concurrency),
        vacuum=_vacuum(ctx, given["vacuum"]) if "vacuum" in given else d.vacuum,
    )


def _vacuum(ctx: _Ctx, node: yaml.Node) -> VacuumMode:
    text = ctx.scalar(node, "worker.vacuum")
    for mode in VACUUM_MODES:
        if text == mode:
            return mode
    raise ctx.fail(
        node,
        "worker.vacuum",
        f"'{text}': write run (VACUUM the changed tables after each pass), job (after "
        "each job) or off",
    )


def _audit(ctx: _Ctx, node: yaml.Node) -> AuditSettings:
    given = ctx.mapping(node, "audit", AUDIT_KEYS)
    file = Path(ctx.scalar(given["file"], "audit.file")) if "file" in given else None
    stdout = ctx.boolean(given["stdout"], "audit.stdout") if "stdout" in given else False
    table = None
    if "table" in given:
        t = ctx.mapping(given["table"], "audit.table", AUDIT_TABLE_KEYS)
        ctx.require(t, given["table"], "audit.table", "dsn")
        table = AuditTable(
            dsn=ctx.scalar(t["dsn"], "audit.table.dsn"),
            name=ctx.scalar(t["name"], "audit.table.name") if "name" in t else AuditTable.name,
            chain=ctx.scalar(t["chain"], "audit.table.chain") if "chain" in t else "erasure",
        )
    if file is None and not stdout and table is None:
        raise ctx.fail(
            node,
            "audit",
            "every erasure is audited: give file: PATH, stdout: true and/or table: {dsn: ...}",
        )
    return AuditSettings(file, stdout, table)


# The documented example (README, tests).
EXAMPLE = """\
subject:                                  # the data subjects: one row each, never deleted
  table: billing.customers
  key: i_customer                         # unique; what `erase subject KEY` takes
  terminated_at: terminated_at            # NULL: not terminated, never touched
  retention:                              # or just a period: `retention: 30` (days)
    default: 0 days                       # when nothing below gives a period
    class_table: {table: billing.customer_classes, key: i_customer_class, column: retention}
tables:
  billing.customers:                      # the subject table: its rows are the subjects
    columns:
      name: {placeholder: "[erased]"}     # set to this text (cast to the column's type)
      email: null                         # set to NULL
      phone: null
      address: null
      custom: {json_keys: [passport, contact.phone]}   # remove these keys (dotted paths)
  billing.accounts:
    owner: {column: i_customer}           # rows whose i_customer is the subject's key
    key: i_account                        # the row's key: {key} in placeholders, batches
    columns:
      id: {placeholder: "erased-{key}"}   # unique columns need {key}
      ip: null
      mac: null
      custom: {json_keys: [sip_user], placeholder: "[erased]"}   # replace where present
  billing.xdrs:
    owner: {column: i_account, through: billing.accounts}   # accounts.i_account (owner.key)
    large: true                           # in batches by (i_account, i_xdr): needs that index
    key: i_xdr
    batch_size: 5000                      # this table's batches (default: worker.batch_size)
    columns: {account_id: null, cli: null, cld: null, ip: null}
  billing.call_recordings:
    owner: {column: i_account, through: billing.accounts}
    action: delete                        # delete the rows (default: update the columns)
worker:
  poll_interval: 60s                      # `erase run`: how often to look for due subjects
  batch_size: 5000
  lock_timeout: 1s                        # every statement; a batch is one statement
  statement_timeout: 30s
  rate_limit: 0                           # rows per second per connection; 0: unlimited
  retries: 5                              # per statement, on lock or statement timeouts
  max_failures: 5                         # postponements before a job is failed
  concurrency: 1                          # jobs at once per process (a connection each)
  vacuum: run                             # VACUUM changed tables after each pass; job; off
audit:
  file: /var/log/pgveil/erasure.jsonl     # hash-chained JSON lines, not the proxy's file
  stdout: false                           # JSON lines on standard output as well
"""
