"""The audit key, keyed checkpoints and the anchor file: what ties a chain to a record that
an insider who can rewrite the audit file cannot forge.

A hash chain alone shows a change to an event, but not a chain rebuilt after a removal
(every hash recomputed) nor a file cut at the end. So the writer seals some events, its
checkpoints (`audit.checkpoint`) and the gaps it records (`audit.gap`), with `mac`, an
HMAC-SHA256 under a key that pgveil and the auditor hold and the audit file's writers do
not: a rebuilt chain cannot reproduce them. The checkpoints also go to an anchor outside
the file (the anchor file, the table sink, the log), so that a cut at the end shows: the
chain must reach every anchor the auditor is given.

The key is never given inline: `env:NAME` (an environment variable holds it) or
`file:PATH` (a file holds it, surrounding whitespace ignored), at least 32 bytes. A key is
named in events by its id, an HMAC of a fixed text (it tells keys apart, never the key).
Nothing here logs or prints a key; error texts name the reference, never the value.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.events import CHECKPOINT, canonical, load_event
from shared import user_files

MIN_KEY_BYTES = 32
_MAC_CONTEXT = b"pgveil audit checkpoint\0"
_ID_CONTEXT = b"pgveil audit key id"


@dataclass(frozen=True)
class KeyRef:
    """Where the audit key is: `env:NAME` or `file:PATH`."""

    kind: str  # "env" or "file"
    ref: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


def parse_key_ref(text: Any) -> KeyRef:
    """`env:NAME` or `file:PATH`; anything else is refused without repeating it (it may
    be the key itself, given inline by mistake)."""
    s = str(text).strip()
    kind, sep, ref = s.partition(":")
    if not sep or kind not in ("env", "file") or not ref.strip():
        raise ValueError(
            "expected env:NAME (an environment variable holds the key) or file:PATH (a file "
            "holds it); the key itself is never given inline"
        )
    return KeyRef(kind, ref.strip())


def load_key(ref: KeyRef, environ: Mapping[str, str] | None = None) -> bytes:
    """The key `ref` points to. ValueError (naming `ref`, never the key) when it is
    missing, unreadable or shorter than MIN_KEY_BYTES."""
    environ = os.environ if environ is None else environ
    if ref.kind == "env":
        if ref.ref not in environ:
            raise ValueError(f"{ref}: environment variable {ref.ref} is not set")
        key = environ[ref.ref].strip().encode()
    else:
        try:
            key = user_files.read_bytes(ref.ref, "the key file").strip()
        except user_files.UnreadableFile as exc:
            raise ValueError(f"{ref}: cannot read the key file: {exc.problem}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"{ref}: the audit key must be at least {MIN_KEY_BYTES} bytes long "
            "(e.g. `openssl rand -hex 32`)"
        )
    return key


def key_id(key: bytes) -> str:
    return hmac.new(key, _ID_CONTEXT, hashlib.sha256).hexdigest()[:16]


def mac(key: bytes, event: Mapping[str, Any]) -> str:
    """The seal of `event`: an HMAC over its canonical encoding without `mac` and `hash`
    (so over its `seq`, `prev`, time, chain and everything else it says)."""
    body = canonical({k: v for k, v in event.items() if k not in ("mac", "hash")})
    return hmac.new(key, _MAC_CONTEXT + body, hashlib.sha256).hexdigest()


def seal_with(key: bytes) -> Any:
    """The `seal` argument of Chain.link_line for `key`."""
    return lambda event: mac(key, event)


def sealed_by(event: Mapping[str, Any], keys: Mapping[str, bytes]) -> bool | None:
    """True when the event's `mac` verifies with the key it names, False when it does not
    (or names no key), None when that key is not among `keys` (or the event is unsealed)."""
    if "mac" not in event:
        return None
    kid = event.get("key")
    if not isinstance(kid, str):
        return False
    key = keys.get(kid)
    if key is None:
        return None
    return hmac.compare_digest(str(event["mac"]), mac(key, event))


@dataclass(frozen=True)
class Anchor:
    """A checkpoint read from outside the chain being verified (or from its anchor file,
    at restart): the event, and where it was found."""

    event: dict[str, Any]
    source: str  # "FILE line N", "table chain NAME"
    # from a store several writers share (the table sink): it holds other chains too
    shared: bool = False

    @property
    def seq(self) -> int:
        return int(self.event["seq"])

    @property
    def hash(self) -> str:
        return str(self.event["hash"])

    @property
    def chain(self) -> str | None:
        c = self.event.get("chain")
        return c if isinstance(c, str) else None


def is_checkpoint(event: Mapping[str, Any]) -> bool:
    return (
        event.get("type") == CHECKPOINT
        and type(event.get("seq")) is int
        and isinstance(event.get("hash"), str)
    )


def read_anchors(path: Path) -> Iterator[Anchor]:
    """The checkpoints in a JSON-lines file: an anchor file, an audit file, an export of
    the table sink. Lines that are not checkpoints are skipped; a line that is not JSON
    is skipped too (the verifier checks the chain, not the anchor file's layout)."""
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if b'"audit.checkpoint"' not in line:
                continue
            try:
                event = load_event(line)
            except ValueError:
                continue
            if isinstance(event, dict) and is_checkpoint(event):
                yield Anchor(event, f"{path} line {n}")


class AnchorFile:
    """Appends checkpoints (their JSON lines) to the anchor file. Handed to the OS at once
    (unbuffered), made durable at close; a failure is the caller's to report."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("ab", buffering=0)
        if self._f.tell():
            # a crash may have cut the last line: the next one starts on its own line
            with path.open("rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self._f.write(b"\n")

    def append(self, lines: list[bytes]) -> None:
        data = b"".join(line + b"\n" for line in lines)
        view = memoryview(data)
        while view:
            view = view[self._f.write(view) :]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.fsync(self._f.fileno())
        self._f.close()


def newest_anchor(path: Path, key: bytes | None) -> tuple[Anchor | None, list[str]]:
    """The newest checkpoint of the anchor file that pgveil can trust at restart (sealed
    with `key`, or, without a key, any), and problems found (lines whose seal does not
    verify with the key: forged). Missing file: (None, [])."""
    if not path.exists():
        return None, []
    newest: Anchor | None = None
    problems: list[str] = []
    keys = {key_id(key): key} if key is not None else {}
    for anchor in read_anchors(path):
        if key is not None:
            sealed = sealed_by(anchor.event, keys)
            if sealed is None:
                continue  # made with another key (before a key change): not ours to judge
            if not sealed:
                problems.append(f"{anchor.source}: the checkpoint's seal does not verify")
                continue
        if newest is None or anchor.seq >= newest.seq:
            newest = anchor
    return newest, problems
