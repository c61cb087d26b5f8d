"""What proxy/, rules/, audit/ and erasure/ share, so that none of them imports another
for it: `dsn` (connecting as libpq does), `logs` (pgveil's log lines), `address`
(HOST:PORT), `quoting` (SQL identifiers as PostgreSQL's quote_ident writes them),
`strict_yaml` (configuration files whose unknown keys are errors).

This package imports none of proxy/, rules/, audit/ or erasure/ (tests/unit/test_layering.py
walks its imports); only `dsn` opens connections, and nothing here keeps state.
"""
