"""Erasure worker: the right to be forgotten (issue #5).

`loader` reads erasure.yaml, `catalog` checks it against the database, `planner` turns it
into SQL (all pure); `executor` and `worker` run it with asyncpg (claim, batches,
verification, audit); `cli` is `pgveil erase`. Nothing in this package logs, prints or
audits a personal value.
"""
