"""Sans-I/O PostgreSQL wire codec: bytes in, message boundaries and messages out.

Must not import asyncio, socket or any I/O module (a test enforces this).
"""
