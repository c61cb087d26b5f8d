"""What masked roles may never use, whatever the statement around it: built-in functions and
relations that read data behind the rewriter's back, and settings that change identity or
how statements are read. Also `Refusal`, the one way the analyser says no.

Pure data: no I/O. Reasons never quote literals from a statement.
"""

from __future__ import annotations

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

# Relations that expose column values or other sessions' query text.
DENIED_RELATIONS = frozenset(
    {
        "pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic",
        "pg_statistic_ext_data", "pg_stat_activity", "pg_stat_statements",
        "pg_stat_statements_info", "pg_prepared_statements", "pg_cursors",
        "pg_largeobject", "pg_shadow", "pg_authid", "pg_user_mappings",
        "pg_backend_memory_contexts",
    }
)  # fmt: skip

# Settings a masked session may not change: identity, and what would make pgveil's parser
# read a statement differently from the server's.
DENIED_SETTINGS = frozenset(
    {"role", "session_authorization", "standard_conforming_strings", "client_encoding",
     "backslash_quote"}
)  # fmt: skip

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
