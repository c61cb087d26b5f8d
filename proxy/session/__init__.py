"""Sans-I/O per-connection protocol engine (events in, actions out).

Must not import asyncio, socket or any I/O module (a test enforces this).
"""
