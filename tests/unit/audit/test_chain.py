"""The audit chain: any modification, deletion, reordering or insertion is found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.events import GENESIS, Chain, canonical, verify
from audit.files import (
    ROTATE,
    AuditFile,
    last_event,
    last_hash,
    read_events,
    rotated_files,
    verify_files,
)


def events(n: int = 5) -> list[dict[str, object]]:
    chain = Chain()
    return [
        chain.link(
            "access", {"session": "s1", "role": "helpdesk", "tables": ["billing.customers"], "n": i}
        )
        for i in range(n)
    ]


def test_intact_chain_and_fields() -> None:
    evs = events()
    assert verify(evs) is None
    assert evs[0]["prev"] == GENESIS and evs[1]["prev"] == evs[0]["hash"]
    assert evs[0]["v"] == 2 and str(evs[0]["ts"]).endswith("Z") and len(str(evs[0]["ts"])) == 27
    assert [e["seq"] for e in evs] == [1, 2, 3, 4, 5]
    ids = [e["id"] for e in evs]
    assert ids == sorted(ids) or len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("tamper", "index", "word"),
    [
        (lambda e: e[2].__setitem__("role", "billing_admin"), 2, "modified"),
        (lambda e: e.pop(2), 2, "deleted"),
        (lambda e: e.insert(1, e.pop(3)), 1, "reordered"),
        (lambda e: e.insert(2, dict(e[2])), 3, "inserted"),
    ],
)
def test_tampering_is_found(tamper: object, index: int, word: str) -> None:
    evs = events()
    tamper(evs)  # type: ignore[operator]
    brk = verify(evs)
    assert brk is not None and brk.index == index and word in brk.reason


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValueError):
        Chain().link("gossip", {})


def test_file_rotation_keeps_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    f = AuditFile(path, max_bytes=600)
    chain = Chain(last_hash(path))
    for i in range(20):
        line = canonical(chain.link("access", {"n": i, "tables": ["t"]}))
        f.write_lines([line, ROTATE] if f.due(len(line) + 1) else [line])
    f.close()
    (tmp_path / "audit.jsonl.anchor").write_text("")  # not a rotated file
    files = rotated_files(path)
    assert len(files) > 2 and all(".anchor" not in p.name for p in files)
    total, brk, _ = verify_files(files)
    assert brk is None and total == 20
    # resuming continues the chain
    chain2 = Chain.following(last_event(path))
    f2 = AuditFile(path)
    f2.write([chain2.link("session.end", {"session": "x"})])
    f2.close()
    assert verify_files(rotated_files(path))[1] is None
    # a deleted rotated file breaks it
    files[1].unlink()
    total, brk, where = verify_files(rotated_files(path))
    assert brk is not None and where == files[2]


def test_cli_verify_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in events(3)))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "audit", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = cli("verify", str(path))
    # links hold, but nothing sealed them: unproven (exit 3), not intact
    assert r.returncode == 3 and "UNPROVEN: 3 event(s), seq 1..3" in r.stdout, r.stdout
    r = cli("tail", str(path), "--table", "billing.customers")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3 and "helpdesk" in r.stdout
    lines = path.read_text().splitlines()
    forged = json.loads(lines[1])
    forged["role"] = "someone_else"
    lines[1] = json.dumps(forged)
    path.write_text("\n".join(lines) + "\n")
    r = cli("verify", str(path))
    assert r.returncode == 1 and "BROKEN: modified" in r.stdout and "line 2" in r.stdout
    assert cli("verify", str(tmp_path / "nope")).returncode == 2
    assert list(read_events(path))


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
# the shapes events have: scalars, lists of names or keys, mappings of table to a count, a
# duration or a list of keys (subjects, rows and seconds per table)
_VALUES = (
    _SCALARS
    | st.lists(st.text() | st.integers(), max_size=5)
    | st.dictionaries(st.text(), _SCALARS | st.lists(st.text(), max_size=3), max_size=4)
)


@settings(max_examples=500)
@given(st.dictionaries(st.text(), _VALUES, max_size=8))
def test_canonical_is_what_json_dumps_writes(event: dict[str, object]) -> None:
    """The fast encoder must write byte for byte what the documented encoding does, or
    chains written by one would not verify with the other."""
    expected = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical(event) == expected.encode()
