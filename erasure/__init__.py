"""Erasure worker: the right to be forgotten.

`loader` reads erasure.yaml, `catalog` checks it against the database, `planner` turns it
into SQL, the job table's statements included (all pure); `executor` and `worker` run it
with asyncpg (claim, batches, verification, audit); its command line, `pgveil erase`, is
proxy/cli/erase.py. Nothing in this package imports proxy/, or logs, prints or audits a
personal value.
"""
