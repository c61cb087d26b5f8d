"""White-box attacks on the audit chain: an insider who has read
audit/verify.py and audit/resume.py edits the files a real writer wrote, lets pgveil start
again over them, and asks `verify` for a verdict. Each case must not come out `intact`.

The auditor's copy of the anchors is the one the insider cannot reach (README: "keep one
copy of the anchors out of their reach"): a shipped copy of the anchor file, to which the
shipper appends whatever the anchor file beside the audit file gets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.anchors import read_anchors
from audit.files import AuditFileError, read_events, read_numbered, rotated_files
from audit.verify import Report, verify_chain
from tests.unit.audit.test_anchored_chain import KEYS, check, kinds, write


def ship(d: Path, shipped: Path) -> None:
    """The shipper: what the anchor file beside the audit file got since the last time
    goes to the auditor's copy (a new anchor file is shipped from its start)."""
    local = (d / "audit.anchor").read_bytes()
    done = shipped.with_suffix(".shipped")
    offset = int(done.read_text()) if done.exists() else 0
    if offset > len(local):
        offset = 0  # the file was replaced: a shipper starts it again
    with shipped.open("ab") as f:
        f.write(local[offset:])
    done.write_text(str(len(local)))


def judged(d: Path, shipped: Path) -> Report:
    files = rotated_files(d / "audit.jsonl")
    return verify_chain(
        [(p.name, read_numbered(p)) for p in files],
        f"{len(files)} file(s)",
        list(read_anchors(shipped)),
        KEYS,
    )


def test_the_whole_history_replaced_by_a_new_chain(tmp_path: Path) -> None:
    """Every audit file and the anchor file beside them removed while pgveil is down: it
    starts a new chain at a new genesis, whose checkpoints the shipper sends on to the
    auditor's copy. The new chain is intact on its own; the auditor's copy still holds
    the anchors of the old one, whose events are nowhere."""
    d = tmp_path / "var"
    d.mkdir()
    shipped = tmp_path / "auditor.anchor"
    write(d, 12)
    ship(d, shipped)
    for p in rotated_files(d / "audit.jsonl"):
        p.unlink()
    (d / "audit.anchor").unlink()
    write(d, 7)
    ship(d, shipped)
    r = judged(d, shipped)
    assert kinds(r) == ["missing chain"], r.lines()
    assert r.exit_code == 1


def test_a_key_written_twice_in_one_line(tmp_path: Path) -> None:
    """A JSON object may name a key twice: Python's reader keeps the last value, other
    readers (a log shipper, a SIEM) the first. An event with `"tables":[]` put in front of
    its real `tables` hashes as the real one, so verify would say intact while such a
    reader sees no table. Such a line is not an audit event."""
    write(tmp_path, 6)
    path = tmp_path / "audit.jsonl"
    raw = path.read_bytes().split(b"\n")
    line = next(i for i, x in enumerate(raw) if b'"type":"access"' in x)
    assert raw[line].startswith(b"{")
    raw[line] = b'{"tables":[],' + raw[line][1:]
    path.write_bytes(b"\n".join(raw))
    r = check(tmp_path)
    assert kinds(r) == ["unreadable"], r.lines()
    with pytest.raises(AuditFileError):
        list(read_events(path))
