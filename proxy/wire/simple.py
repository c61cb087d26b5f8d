"""The simple-query cycle and the one-byte session messages: Query, ReadyForQuery,
Terminate.

Pure: must not import asyncio, socket or anything that performs I/O, and must not log: a
Query's text holds the client's literals.
"""

from __future__ import annotations

from typing import Final

from proxy.wire.messages import QUERY, READY_FOR_QUERY, TERMINATE, TX_IDLE, message


def query_text(body: bytes) -> bytes:
    """The text of a Query body, without its terminator."""
    return body[:-1]


def query(text: bytes) -> bytes:
    """A whole Query message of `text` (which holds no NUL byte)."""
    return message(QUERY, text + b"\0")


def tx_status(body: bytes) -> int:
    """The transaction status of a ReadyForQuery body (TX_IDLE, TX_IN_BLOCK, TX_FAILED)."""
    return body[0] if body else TX_IDLE


def ready_for_query(status: int = TX_IDLE) -> bytes:
    return message(READY_FOR_QUERY, bytes((status,)))


TERMINATE_MESSAGE: Final = message(TERMINATE)
