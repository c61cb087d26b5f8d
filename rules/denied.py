"""What masked roles may never use, whatever the statement around it: built-in functions and
relations that read data behind the rewriter's back, and settings that change identity or
how statements are read; the system relations masked roles read rewritten, with the columns
they keep (`SYSTEM_VIEWS`). Also `Refusal`, the one way the analyser says no.

Pure data: no I/O. Reasons never quote literals from a statement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

# Built-in functions that read data behind the rewriter's back: they run SQL text, read a
# relation named by a value, read files or large objects, or show query text.
DENIED_FUNCTIONS = frozenset(
    {
        "ts_rewrite", "query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema",
        "table_to_xml", "table_to_xml_and_xmlschema", "table_to_xmlschema",
        "cursor_to_xml", "cursor_to_xmlschema",
        "schema_to_xml", "schema_to_xml_and_xmlschema", "schema_to_xmlschema",
        "database_to_xml", "database_to_xml_and_xmlschema", "database_to_xmlschema",
        "ts_stat", "lo_get", "lo_export", "lo_import", "loread", "lo_open", "lo_put",
        "pg_read_file", "pg_read_binary_file", "pg_stat_file", "pg_ls_dir",
        "current_query", "pg_stat_get_activity", "pg_stat_get_backend_activity",
        "pg_cursor", "pg_prepared_statement", "pg_stat_statements",
        "pg_logical_slot_get_changes", "pg_logical_slot_peek_changes",
        "pg_logical_slot_get_binary_changes", "pg_logical_slot_peek_binary_changes",
        "pg_get_backend_memory_contexts",
    }
)  # fmt: skip
DENIED_PREFIXES = ("dblink",)

# Relations that expose column values or statement text, by name: refused wherever they
# are named (in any schema), except where a masked role reads one of the SYSTEM_VIEWS in
# FROM (pg_catalog's, or the extension's own), which is rewritten instead.
DENIED_RELATIONS = frozenset(
    {
        "pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic",
        "pg_statistic_ext_data", "pg_stat_activity", "pg_stat_statements",
        "pg_stat_statements_info", "pg_prepared_statements", "pg_cursors",
        "pg_largeobject", "pg_shadow", "pg_authid", "pg_user_mappings",
        "pg_backend_memory_contexts",
    }
)  # fmt: skip
# Of those, never readable: raw statistics (pg_statistic's anyarray slots, the extended
# statistics' MCV lists), large objects' data, password hashes. All but pg_largeobject's
# metadata are for superusers only in any case; pg_stats and pg_stats_ext show the same
# statistics rewritten.


@dataclass(frozen=True)
class SystemView:
    """A system relation (or set-returning function) that masked roles read rewritten: a
    subquery in which the columns in `kept` are as the server has them and every other
    column is NULL of its type, a column a newer server adds included (closed by
    construction). `nulled` names the columns known to carry values or statement text; a
    test checks that `kept | nulled` are exactly the server's columns, so a new column is
    looked at. `extension`: "" for pg_catalog's; else the relation is read only where that
    extension created it (a relation of the same name elsewhere is refused).

    `guarded` (some of `kept`): numbers computed from a relation's values, as the server has
    them only in the rows of a relation pgveil knows to hold nothing personal (a table
    without rules, or a protected table's column without a mask), NULL elsewhere: a
    personal column's number of distinct values, frequencies, correlation or width answer
    whether a value a masked role inserted equals, or sorts before, a stored one (an
    ANALYZE, which autovacuum runs unasked, later). `keys`: the columns that name the
    relation (schema, table) and, where there is one, the column of each row."""

    kept: frozenset[str]
    nulled: frozenset[str]
    extension: str = ""
    guarded: frozenset[str] = frozenset()
    keys: tuple[str, ...] = ()


def _view(
    kept: str, nulled: str, extension: str = "", guarded: str = "", keys: str = ""
) -> SystemView:
    return SystemView(
        frozenset(kept.split()),
        frozenset(nulled.split()),
        extension,
        frozenset(guarded.split()),
        tuple(keys.split()),
    )


# (of pg_stats and pg_stats_ext_exprs: the numbers, kept only where guarded allows)
_STATS_NUMBERS = (
    "null_frac avg_width n_distinct most_common_freqs correlation most_common_elem_freqs"
)
_STATS_KEPT = f"schemaname tablename attname inherited {_STATS_NUMBERS}"
_STATS_NULLED = "most_common_vals histogram_bounds most_common_elems elem_count_histogram"
_ACTIVITY = (
    "datid pid leader_pid usesysid application_name client_addr client_hostname client_port "
    "backend_start xact_start query_start state_change wait_event_type wait_event state "
    "backend_xid backend_xmin backend_type"
)
_PREPARED = "name prepare_time parameter_types from_sql generic_plans custom_plans"
_CURSORS = "name is_holdable is_binary is_scrollable creation_time"
_MEMORY = "name parent level total_bytes total_nblocks free_bytes free_chunks used_bytes"

# What a masked role reads of each (see README, "What a masked session gets"). Statement
# text is NULL everywhere: it may hold literals of personal data (any session's, the
# session's own included) and pgveil's own rewritten text, with the hash mask's key pads.
# So is a statement's identifier (query_id, pg_stat_statements' queryid): PostgreSQL 15
# computes a utility statement's (EXECUTE p('...'), DECLARE, COPY, CALL, SET, DO) as a hash of
# its text, literals and comments included, which confirms a guessed value.
# Statistics lose the values they were computed from; they keep their numbers (fractions,
# widths, counts, frequencies, correlation) only for relations and columns that hold nothing
# personal (see SystemView.guarded: a personal column's numbers are an oracle). Who is
# connected from where (roles, client addresses, application names, times, states)
# describes sessions, not data subjects, and the server shows it only as its own privileges
# allow: kept.
SYSTEM_VIEWS: Final[Mapping[str, SystemView]] = MappingProxyType(
    {
        "pg_stat_activity": _view(f"{_ACTIVITY} datname usename", "query query_id"),
        "pg_stats": _view(
            _STATS_KEPT, _STATS_NULLED, guarded=_STATS_NUMBERS, keys="schemaname tablename attname"
        ),
        "pg_stats_ext": _view(
            "schemaname tablename statistics_schemaname statistics_name statistics_owner "
            "attnames exprs kinds inherited n_distinct dependencies most_common_freqs "
            "most_common_base_freqs",
            "most_common_vals most_common_val_nulls",
            guarded="n_distinct dependencies most_common_freqs most_common_base_freqs",
            keys="schemaname tablename",
        ),
        "pg_stats_ext_exprs": _view(
            "schemaname tablename statistics_schemaname statistics_name statistics_owner expr "
            f"inherited {_STATS_NUMBERS}",
            _STATS_NULLED,
            guarded=_STATS_NUMBERS,
            keys="schemaname tablename",
        ),
        "pg_prepared_statements": _view(_PREPARED, "statement"),
        "pg_cursors": _view(_CURSORS, "statement"),
        # ident: a cached plan's query text, among others
        "pg_backend_memory_contexts": _view(_MEMORY, "ident"),
        # umoptions: the foreign server's user name and password
        "pg_user_mappings": _view("umid srvid srvname umuser usename", "umoptions"),
        "pg_stat_statements": _view(
            "userid dbid toplevel plans total_plan_time min_plan_time max_plan_time "
            "mean_plan_time stddev_plan_time calls total_exec_time min_exec_time "
            "max_exec_time mean_exec_time stddev_exec_time rows shared_blks_hit "
            "shared_blks_read shared_blks_dirtied shared_blks_written local_blks_hit "
            "local_blks_read local_blks_dirtied local_blks_written temp_blks_read "
            "temp_blks_written blk_read_time blk_write_time temp_blk_read_time "
            "temp_blk_write_time wal_records wal_fpi wal_bytes jit_functions "
            "jit_generation_time jit_inlining_count jit_inlining_time "
            "jit_optimization_count jit_optimization_time jit_emission_count "
            "jit_emission_time",
            "query queryid",
            "pg_stat_statements",
        ),
        "pg_stat_statements_info": _view("dealloc stats_reset", "", "pg_stat_statements"),
    }
)
# The set-returning functions behind those views, read the same way when a FROM item is a
# plain call of one (`FROM pg_stat_get_activity(NULL) a`); anywhere else they stay denied.
SYSTEM_FUNCTIONS: Final[Mapping[str, SystemView]] = MappingProxyType(
    {
        "pg_stat_get_activity": _view(
            f"{_ACTIVITY} ssl sslversion sslcipher sslbits ssl_client_dn ssl_client_serial "
            "ssl_issuer_dn gss_auth gss_princ gss_enc",
            "query query_id",
        ),
        "pg_prepared_statement": _view(_PREPARED, "statement"),
        "pg_cursor": _view(_CURSORS, "statement"),
        "pg_get_backend_memory_contexts": _view(_MEMORY, "ident"),
    }
)

# Settings a masked session may not change: identity, and what would make pgveil's parser
# read a statement differently from the server's.
DENIED_SETTINGS = frozenset(
    {"role", "session_authorization", "standard_conforming_strings", "client_encoding",
     "backslash_quote"}
)  # fmt: skip
# Of those, the ones pgveil reads statements under, with the value it reads them under (as
# rules.settings.pinned_value names it). A SET, SET LOCAL or set_config of that very value,
# as the server reads it, changes nothing and is allowed (libpq's PQsetClientEncoding sends
# `set client_encoding to 'UTF8'`, drivers `SET standard_conforming_strings = on`).
PINNED_SETTINGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "client_encoding": "UTF8",
        "standard_conforming_strings": "on",
        "backslash_quote": "safe_encoding",
    }
)
# ... and of those, the ones whose value at login the session checked (the server reports
# them): RESET and SET ... TO DEFAULT return to that value, so they change nothing either
# (backslash_quote's login value may be anything a role or database setting made it).
REPORTED_SETTINGS = frozenset({"client_encoding", "standard_conforming_strings"})

# What pgveil's guard on a write into a deny column makes the server's error say, followed
# by the column (rules.writes.Rewriter.deny_guard): the masked-session filter turns that
# error into its refusal.
DENY_WRITE_MARKER = "pgveil_deny_write"

# System columns: readable through the masking subquery's table, never personal.
SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})


class Refusal(Exception):
    """The statement must not run; `reason` is shown to the client (no literals in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
