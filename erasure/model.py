"""The erasure configuration as immutable values: what the loader produces and the planner reads.

Pure data: no I/O, no SQL. Names are kept exactly as written in the configuration (the
catalog is case-sensitive); `shared.quoting.quote_ident` turns a name into SQL text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared.quoting import quote_ident


@dataclass(frozen=True, order=True)
class TableName:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


ColumnKind = Literal["null", "placeholder", "json_remove", "json_placeholder"]
# when the worker VACUUMs the tables it changed: after each pass over the due subjects
# (and after `erase subject`), after each job, or never
VacuumMode = Literal["run", "job", "off"]
VACUUM_MODES: tuple[VacuumMode, ...] = ("run", "job", "off")


@dataclass(frozen=True)
class ColumnAction:
    """What happens to one personal column of the rows that belong to a subject.

    `null`: set to NULL. `placeholder`: set to `placeholder` (text cast to the column's type;
    `{key}` in it becomes the row's key). `json_remove`: remove the keys at `json_paths`.
    `json_placeholder`: replace the values at `json_paths`, where present, by `placeholder`.
    """

    column: str
    kind: ColumnKind
    placeholder: str | None = None
    json_paths: tuple[tuple[str, ...], ...] = ()

    @property
    def uses_key(self) -> bool:
        return self.placeholder is not None and "{key}" in self.placeholder


@dataclass(frozen=True)
class Owner:
    """How the rows of a table belong to a subject: `column` equals `key` of `through`
    (None: the subject table, and `key` is the subject key)."""

    column: str
    through: TableName | None
    key: str


@dataclass(frozen=True)
class TableSpec:
    table: TableName
    owner: Owner | None  # None only for the subject table itself
    action: Literal["update", "delete"]
    columns: tuple[ColumnAction, ...]
    large: bool = False
    key: str | None = None  # the batch key (large tables) and what `{key}` means
    batch_size: int | None = None

    @property
    def path(self) -> str:
        """Its key path in the configuration file."""
        return f"tables.{self.table}"


@dataclass(frozen=True)
class Retention:
    """How long after termination a subject's data is kept.

    Intervals are PostgreSQL interval text (validated by the loader). `by_class`: a mapping
    from the text of `by_class_column`'s value to an interval. `class_table`: the interval
    (or whole days) in `class_column` of the row of `class_table` whose `class_key` equals the
    subject's `class_subject_column`. Whatever is unknown or NULL falls back to `default`.
    """

    default: str = "0 days"
    by_class_column: str | None = None
    by_class: tuple[tuple[str, str], ...] = ()
    class_table: TableName | None = None
    class_key: str | None = None
    class_subject_column: str | None = None
    class_column: str | None = None


@dataclass(frozen=True)
class SubjectSpec:
    table: TableName
    key: str
    terminated_at: str
    retention: Retention = field(default_factory=Retention)


@dataclass(frozen=True)
class WorkerSettings:
    poll_interval_s: float = 60.0
    batch_size: int = 5000
    lock_timeout_ms: int = 1000
    statement_timeout_ms: int = 30_000
    rate_limit: int = 0  # rows per second per job; 0: unlimited
    retries: int = 5  # per batch, on lock or statement timeouts, with back-off
    max_failures: int = 5  # times a job may be postponed by timeouts before it fails
    concurrency: int = 1  # jobs one process works on at once (one connection each)
    vacuum: VacuumMode = "run"  # prune the erased rows' old versions (see VacuumMode)


@dataclass(frozen=True)
class AuditTable:
    """The audit table sink: the proxy's format and table (audit.sinks.TableSink)."""

    dsn: str = field(repr=False)  # may hold a password
    name: str = "pgveil.audit_events"
    chain: str = "erasure"  # one chain for every worker that writes it


@dataclass(frozen=True)
class AuditSettings:
    file: Path | None = None
    stdout: bool = False
    table: AuditTable | None = None


@dataclass(frozen=True)
class ErasureConfig:
    source: str  # the file name, for messages
    subject: SubjectSpec
    tables: tuple[TableSpec, ...]
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    version: str = ""  # a hash of the file's text
    lines: Mapping[str, int] = field(default_factory=dict)  # key path -> line (1-based)

    def table(self, name: TableName) -> TableSpec | None:
        for t in self.tables:
            if t.table == name:
                return t
        return None

    def where(self, path: str) -> str:
        """`file:line at 'path'` for a message about the key at `path` (or its parent)."""
        probe = path
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = f":{self.lines[probe]}" if probe in self.lines else ""
        return f"{self.source}{line} at '{path}'"
