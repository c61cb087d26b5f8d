"""Masking rules: the YAML rule file, the masks, and the statement analyser and rewriter.

Arrives with issue #3. Must not import asyncio, socket or asyncpg: it is consulted by the
sans-I/O session engine.
"""

# before any module of the package: which implementation of the data path loads (issue 15)
from shared import implementation as _implementation

_implementation.install()
