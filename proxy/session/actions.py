"""The engine's actions: what the shell is asked to do, in the order given.

Actions are imperative (DESIGN §5). The engine (proxy/session/engine.py) and the session
filters (proxy/session/filters.py) return them; the shell (proxy/server.py) carries each
one out through a single table from action class to handler.

This module holds data types only: no logic, no I/O, no message bodies beyond the bytes an
action carries to its destination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from rules.context import ContextHolder


class Action:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SendToClient(Action):
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToServer(Action):
    data: bytes


class Forward(Action):
    """Write the chunk just fed to the engine to the other side, unchanged."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FORWARD"


FORWARD: Final = Forward()
# not Final: compiled (mypyc), a Final tuple is a constant of the compiled code and the
# module attribute a copy of it, and the shell tests for this very object
JUST_FORWARD: tuple[Action, ...] = (FORWARD,)
"""The answer of the hot path; the shell may test for it by identity."""
NOTHING: tuple[Action, ...] = ()


@dataclass(frozen=True, slots=True)
class StartClientTLS(Action):
    """Upgrade the client connection to TLS (after 'S' was written)."""


@dataclass(frozen=True, slots=True)
class ConnectUpstream(Action):
    """Open the upstream connection and send it this startup packet."""

    startup_packet: bytes


@dataclass(frozen=True, slots=True)
class SendCancel(Action):
    """Deliver a CancelRequest to the upstream server on a connection of its own, then close
    the client's connection once the server has closed that one (as a server does once it
    has acted on the request: a client that waits for the close, as libpq and asyncpg do,
    must not send its next query before the cancel has landed)."""

    request: bytes


@dataclass(frozen=True, slots=True)
class CloseSession(Action):
    """Flush what was written, then close both connections."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClassifyLogin(Action):
    """The server accepted the login (its ReadyForQuery arrived): classify `user` (the
    session user the server reports) and answer with `Session.login_classified` or
    `Session.login_unclassifiable`. Until then the server's answers are held."""

    user: str


@dataclass(frozen=True, slots=True)
class AwaitCatalog(Action):
    """A masked session's statement names what the catalog read does not have: wait (a
    bounded time) until `holder` has the result of catalog read number `read` (one that
    began after the statement arrived), then call `Session.catalog_awaited`. The client's
    stream waits meanwhile (see StatementFilter.resume)."""

    holder: ContextHolder
    read: int


@dataclass(frozen=True, slots=True)
class RecordSessionStart(Action):
    """The login completed and its classification is known: record the session's start
    (audit) before anything that follows reaches the client."""
