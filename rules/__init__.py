"""Masking rules: the YAML rule file, the masks, and the statement analyser and rewriter.

Arrives with issue #3. Must not import asyncio, socket or asyncpg: it is consulted by the
sans-I/O session engine.
"""
