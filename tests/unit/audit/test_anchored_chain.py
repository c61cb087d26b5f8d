"""The chain shows deletions: files written by the real writer (real files, checkpoints
sealed with a key, an anchor file), tampered with as an insider would, then judged by the
verifier; and the writer's restart over a cut, torn or missing file."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from audit import resume
from audit.anchors import (
    Anchor,
    KeyRef,
    key_id,
    load_key,
    mac,
    newest_anchor,
    parse_key_ref,
    read_anchors,
)
from audit.events import CHECKPOINT, GAP, GENESIS, canonical
from audit.files import read_numbered, rotated_files
from audit.sinks import FileSink, StdoutSink, SyncSink
from audit.verify import Report, verify_chain
from audit.writer import AuditWriter
from proxy.config import ConfigError, load_config
from tests.audit_tamper import drop_lines, events, lines, put, rebuild

KEY = b"an-audit-key-of-more-than-32-bytes-for-tests"
KEYS = {key_id(KEY): KEY}
EVERY = 5


def write(
    d: Path,
    n: int,
    *,
    key: bytes | None = KEY,
    max_bytes: int = 10**9,
    anchor: bool = True,
    sinks: list[SyncSink] | None = None,
) -> AuditWriter:
    """`n` access events through a real writer, started and closed like the proxy's."""

    async def go() -> AuditWriter:
        w = AuditWriter(
            sinks if sinks is not None else [FileSink(d / "audit.jsonl", max_bytes=max_bytes)],
            key=key,
            anchor=d / "audit.anchor" if anchor else None,
            checkpoint_every=EVERY,
        )
        await w.start()
        for i in range(n):
            w.submit("access", {"tables": ["billing.customers"], "subjects_total": {"t": i}})
        await w.close()
        return w

    return asyncio.run(go())


def check(
    d: Path,
    files: list[Path] | None = None,
    anchors: bool = True,
    keys: dict[str, bytes] | None = None,
    after: str | None = None,
) -> Report:
    files = files if files is not None else rotated_files(d / "audit.jsonl")
    found = list(read_anchors(d / "audit.anchor")) if anchors else []
    return verify_chain(
        [(p.name, read_numbered(p)) for p in files],
        f"{len(files)} file(s)",
        found,
        KEYS if keys is None else keys,
        after,
    )


def kinds(r: Report) -> list[str]:
    return [f.kind for f in r.findings]


def all_events(d: Path) -> list[dict[str, Any]]:
    return [e for p in rotated_files(d / "audit.jsonl") for e in events(p)]


# ---- intact, and what is left unproven -------------------------------------------------


def test_an_untouched_chain_is_intact_and_names_its_anchored_head(tmp_path: Path) -> None:
    write(tmp_path, 12)
    write(tmp_path, 3)  # a restart: a start checkpoint, then more events
    r = check(tmp_path)
    assert r.exit_code == 0, r.lines()
    evs = all_events(tmp_path)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert evs[0]["prev"] == GENESIS
    reasons = [e["reason"] for e in evs if e["type"] == CHECKPOINT]
    assert reasons == ["count", "count", "shutdown", "start", "shutdown"]
    assert r.head is not None and r.head.seq == evs[-1]["seq"] and r.after_head == 0
    text = "\n".join(r.lines())
    assert text.startswith("intact: ") and "starts at its genesis" in text
    assert f"anchored head: seq {evs[-1]['seq']}" in text


def test_without_key_anchor_or_seal_the_verdict_is_unproven(tmp_path: Path) -> None:
    write(tmp_path, 7)
    no_key = check(tmp_path, keys={})
    assert no_key.exit_code == 3 and "with --key" in no_key.unproven[0], no_key.unproven
    no_anchor = check(tmp_path, anchors=False)
    assert no_anchor.exit_code == 3 and "anchors its end" in no_anchor.unproven[0]
    other = tmp_path / "unsealed"
    other.mkdir()
    write(other, 7, key=None)
    unsealed = check(other)
    assert unsealed.exit_code == 3 and "sealed" in unsealed.unproven[0], unsealed.unproven


def test_files_in_any_order(tmp_path: Path) -> None:
    write(tmp_path, 40, max_bytes=2500)
    files = rotated_files(tmp_path / "audit.jsonl")
    assert len(files) >= 3
    shuffled = [files[1], files[-1], files[0], *files[2:-1]]
    from proxy.cli.audit import _order

    assert _order(shuffled) == files
    assert check(tmp_path, files).exit_code == 0


# ---- each kind of tampering ------------------------------------------------------------


def test_events_removed_at_the_start(tmp_path: Path) -> None:
    write(tmp_path, 12)
    drop_lines(tmp_path / "audit.jsonl", 0, 3)
    r = check(tmp_path)
    assert kinds(r) == ["begins after a gap"], r.lines()
    assert "3 event(s) (seq 1..3)" in r.findings[0].detail


def test_events_removed_at_the_end_below_the_anchor(tmp_path: Path) -> None:
    write(tmp_path, 12)
    drop_lines(tmp_path / "audit.jsonl", -4)
    r = check(tmp_path)
    assert kinds(r) == ["truncated after anchor"], r.lines()
    last = all_events(tmp_path)[-1]["seq"]
    assert f"ends at seq {last}" in r.findings[0].detail
    assert "at least 4 event(s)" in r.findings[0].detail


def test_the_oldest_rotated_file_removed(tmp_path: Path) -> None:
    write(tmp_path, 40, max_bytes=2500)
    files = rotated_files(tmp_path / "audit.jsonl")
    files[0].unlink()
    r = check(tmp_path)
    assert kinds(r) == ["begins after a gap"], r.lines()


def test_a_rotated_file_in_the_middle_removed(tmp_path: Path) -> None:
    write(tmp_path, 40, max_bytes=2500)
    files = rotated_files(tmp_path / "audit.jsonl")
    gone = events(files[1])
    files[1].unlink()
    r = check(tmp_path)
    assert kinds(r) == ["missing file"], r.lines()
    assert f"seq {gone[0]['seq']}..{gone[-1]['seq']}" in r.findings[0].detail


def test_pruned_old_files_verify_from_the_hash_the_auditor_gives(tmp_path: Path) -> None:
    """Retention removes old files on purpose: that is only told from a removal by the
    auditor, who gives the last hash the removed files held (--after)."""
    write(tmp_path, 40, max_bytes=2500)
    files = rotated_files(tmp_path / "audit.jsonl")
    last_of_first = events(files[0])[-1]
    assert last_of_first["reason"] == "rotation"  # the old file ends with its checkpoint
    files[0].unlink()
    assert kinds(check(tmp_path)) == ["begins after a gap"]
    r = check(tmp_path, after=last_of_first["hash"])
    assert r.exit_code == 0 and r.start.startswith("the hash given"), r.lines()
    assert kinds(check(tmp_path, after="0" * 63 + "1")) == ["begins after a gap"]


def test_an_event_removed_inside(tmp_path: Path) -> None:
    write(tmp_path, 12)
    drop_lines(tmp_path / "audit.jsonl", 2, 3)
    r = check(tmp_path)
    assert kinds(r) == ["deleted inside"], r.lines()
    assert "seq 3..3 (1 event(s)) missing" in r.findings[0].detail


def test_an_event_modified(tmp_path: Path) -> None:
    write(tmp_path, 6)
    path = tmp_path / "audit.jsonl"
    evs = events(path)
    evs[2]["subjects_total"] = {"t": 99}
    put(path, evs)
    r = check(tmp_path)
    assert kinds(r) == ["modified"], r.lines()


def test_removed_and_rehashed_the_seals_do_not_verify(tmp_path: Path) -> None:
    write(tmp_path, 12)
    rebuild([tmp_path / "audit.jsonl"], drop=3)
    r = check(tmp_path, anchors=False)  # the key alone finds it
    assert r.findings and r.findings[0].kind == "re-hashed", r.lines()
    assert "seal does not verify" in r.findings[0].detail


def test_removed_and_rehashed_without_renumbering(tmp_path: Path) -> None:
    write(tmp_path, 12)
    rebuild([tmp_path / "audit.jsonl"], drop=3, renumber=False)
    r = check(tmp_path, anchors=False, keys={})  # even without the key: seq jumps
    assert r.findings[0].kind == "re-hashed" and "seq jumps from 2 to 4" in r.findings[0].detail


def test_rehashed_with_every_checkpoint_removed(tmp_path: Path) -> None:
    """The checkpoints cannot be rebuilt, so the insider removes them: the anchors show
    it, and so does the cadence the last surviving checkpoint promised."""
    write(tmp_path, 30)
    rebuild([tmp_path / "audit.jsonl"], drop=8, drop_checkpoints=True)
    r = check(tmp_path)
    assert "re-hashed" in kinds(r), r.lines()
    assert any("more than 5 events after the checkpoint" in f.detail for f in r.findings)
    r = check(tmp_path, anchors=False)
    assert r.exit_code == 1 and "re-hashed" in kinds(r), r.lines()


def test_a_forged_anchor(tmp_path: Path) -> None:
    write(tmp_path, 6)
    anchor = tmp_path / "audit.anchor"
    forged = [json.loads(line) for line in lines(anchor)]
    forged[-1]["seq"] += 100
    forged[-1]["mac"] = mac(b"x" * 32, forged[-1])
    put(anchor, forged)
    r = check(tmp_path)
    assert r.findings[0].kind == "forged anchor", r.lines()


def test_checkpoints_of_an_unknown_key_are_unproven(tmp_path: Path) -> None:
    write(tmp_path, 6)
    other = b"another-key-of-more-than-32-bytes-long"
    r = check(tmp_path, keys={key_id(other): other})
    assert r.exit_code == 3 and key_id(KEY) in r.unproven[0], r.unproven


def test_an_unreadable_line(tmp_path: Path) -> None:
    write(tmp_path, 6)
    path = tmp_path / "audit.jsonl"
    kept = lines(path)
    kept[2] = kept[2][:40]
    path.write_bytes(b"".join(line + b"\n" for line in kept))
    r = check(tmp_path)
    assert kinds(r)[0] == "unreadable" and "line 3" in r.findings[0].where, r.lines()


# ---- restart: never resume silently from a cut file ------------------------------------


def gaps(d: Path) -> list[dict[str, Any]]:
    found = []
    for p in rotated_files(d / "audit.jsonl"):
        found += [e for _n, e in read_numbered(p) if e is not None and e["type"] == GAP]
    return found


def test_restart_after_a_cut_records_a_gap_and_goes_on_past_the_anchor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, 12)
    anchored = events(tmp_path / "audit.jsonl")[-1]
    drop_lines(tmp_path / "audit.jsonl", -6)
    cut = events(tmp_path / "audit.jsonl")[-1]
    with caplog.at_level(logging.ERROR, logger="pgveil.audit"):
        write(tmp_path, 2)
    assert any(r.getMessage() == "audit.gap" for r in caplog.records)
    (gap,) = gaps(tmp_path)
    assert gap["seq"] == anchored["seq"] + 1 and gap["prev"] == anchored["hash"]
    assert gap["expected"] == {
        "seq": anchored["seq"],
        "hash": anchored["hash"],
        "from": "anchor file",
    }
    found = gap["found"]["audit file"]
    assert found["seq"] == cut["seq"] and found["hash"] == cut["hash"]
    assert "before the anchored checkpoint" in found["problem"]
    assert gap["key"] == key_id(KEY) and gap["mac"] == mac(KEY, gap)
    r = check(tmp_path)
    assert kinds(r) == ["recorded gap"], r.lines()
    assert f"seq {cut['seq'] + 1}..{anchored['seq']}" in r.findings[0].detail
    # and the chain after the gap is sound: a clean restart adds no gap
    write(tmp_path, 1)
    assert len(gaps(tmp_path)) == 1 and kinds(check(tmp_path)) == ["recorded gap"]


def test_restart_after_a_torn_last_line(tmp_path: Path) -> None:
    write(tmp_path, 4)
    path = tmp_path / "audit.jsonl"
    with path.open("ab") as f:
        f.write(b'{"v":2,"ts":"2026-')  # a crash in the middle of a write
    write(tmp_path, 1)
    (gap,) = gaps(tmp_path)
    assert "not an audit event" in gap["found"]["audit file"]["problem"]
    r = check(tmp_path)
    assert kinds(r) == ["unreadable"], r.lines()  # new events start on a line of their own


def test_restart_after_the_file_was_removed(tmp_path: Path) -> None:
    write(tmp_path, 4)
    (tmp_path / "audit.jsonl").unlink()
    write(tmp_path, 1)
    (gap,) = gaps(tmp_path)
    assert gap["found"]["audit file"] == {
        "seq": 0,
        "hash": None,
        "problem": gap["found"]["audit file"]["problem"],
    }
    assert "missing or empty" in gap["found"]["audit file"]["problem"]
    assert kinds(check(tmp_path)) == ["begins after a gap"]


def test_restart_with_a_rehashed_tail_records_a_gap(tmp_path: Path) -> None:
    write(tmp_path, 6)
    write(tmp_path, 3)
    evs = events(tmp_path / "audit.jsonl")
    start = next(e for e in evs if e.get("reason") == "start")
    rebuild([tmp_path / "audit.jsonl"], drop=start["seq"] + 1, renumber=False)
    # the anchor file still holds the shutdown checkpoint: the rebuilt one differs
    write(tmp_path, 1)
    (gap,) = gaps(tmp_path)
    assert "another event than the anchored one" in gap["found"]["audit file"]["problem"]


def test_a_clean_restart_goes_on_without_a_gap(tmp_path: Path) -> None:
    write(tmp_path, 3)
    w = write(tmp_path, 3)
    assert w.gaps == 0 and not gaps(tmp_path)
    assert check(tmp_path).exit_code == 0


def test_a_forged_anchor_line_is_not_trusted_at_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, 3)
    anchor = tmp_path / "audit.anchor"
    fake = json.loads(lines(anchor)[-1])
    fake["seq"] += 50
    put(anchor, [*events(anchor), fake])
    with caplog.at_level(logging.ERROR, logger="pgveil.audit"):
        found, problems = newest_anchor(anchor, KEY)
        assert found is not None and found.seq == fake["seq"] - 50 and len(problems) == 1
        write(tmp_path, 1)
    assert not gaps(tmp_path)
    assert any(r.getMessage() == "audit.anchor_forged" for r in caplog.records)


def test_stdout_only_goes_on_from_its_anchor(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """No file to read back: the chain on standard output goes on from the anchor, so a
    log shipper's copy is one chain across restarts."""
    write(tmp_path, 2, sinks=[StdoutSink()])
    first = [json.loads(x) for x in capfd.readouterr().out.splitlines()]
    write(tmp_path, 1, sinks=[StdoutSink()])
    second = [json.loads(x) for x in capfd.readouterr().out.splitlines()]
    assert second[0]["prev"] == first[-1]["hash"] and second[0]["seq"] == first[-1]["seq"] + 1


def test_plan_names_every_copy_that_falls_short() -> None:
    a = Anchor({"seq": 9, "hash": "h9", "chain": "c1", "type": CHECKPOINT}, "anchor")
    short = resume.FileState(resume.End(4, "h4"), "c1")
    p = resume.plan(a, short, resume.End(12, "h12"), has_table=True)
    assert (p.seq, p.hash, p.chain) == (12, "h12", "c1")
    assert p.gap is not None and p.gap["expected"]["from"] == "table sink"
    assert set(p.gap["found"]) == {"audit file"}
    p = resume.plan(None, resume.FileState(resume.End(7, "h7")), None, has_table=True)
    assert p.gap is not None and p.gap["found"]["table sink"]["hash"] is None
    p = resume.plan(None, resume.FileState(), None, has_table=False)
    assert not p.resumed and p.gap is None and p.seq == 0 and len(p.chain) == 16


# ---- the key --------------------------------------------------------------------------


def test_key_references_are_strict_and_never_echo_the_key(tmp_path: Path) -> None:
    secret = "s3cret-inline-value-that-is-long-enough-1234"
    with pytest.raises(ValueError) as exc:
        parse_key_ref(secret)
    assert secret not in str(exc.value)
    assert parse_key_ref(" env:PGVEIL_K ") == KeyRef("env", "PGVEIL_K")
    with pytest.raises(ValueError, match="not set"):
        load_key(KeyRef("env", "NOPE"), {})
    with pytest.raises(ValueError, match="at least 32 bytes"):
        load_key(KeyRef("env", "K"), {"K": "short"})
    f = tmp_path / "key"
    f.write_text("k" * 40 + "\n")
    assert load_key(KeyRef("file", str(f))) == b"k" * 40
    with pytest.raises(ValueError, match="cannot read"):
        load_key(KeyRef("file", str(tmp_path / "none")))


def test_proxy_config_checks_the_key_at_load(tmp_path: Path) -> None:
    audit = {"audit_file": str(tmp_path / "a.jsonl")}
    env = {"PGVEIL_AUDIT_KEY": "env:AK", "AK": "x" * 32}
    cfg = load_config(audit, env)
    assert cfg.audit_key == KeyRef("env", "AK") and "x" * 32 not in repr(cfg)
    for flags, environ, error in [
        (audit, {"PGVEIL_AUDIT_KEY": "x" * 40}, "never given inline"),
        (audit, {"PGVEIL_AUDIT_KEY": "env:AK"}, "AK is not set"),
        (audit, {"PGVEIL_AUDIT_KEY": "env:AK", "AK": "short"}, "at least 32 bytes"),
        ({}, env, "no audit sink"),
        ({**audit, "audit_anchor_file": audit["audit_file"]}, {}, "must not be the audit file"),
    ]:
        with pytest.raises(ConfigError, match=error) as exc:
            load_config(flags, environ)
        assert "x" * 40 not in str(exc.value)


# ---- the command line -----------------------------------------------------------------


def test_cli_verdicts_and_exit_codes(tmp_path: Path) -> None:
    write(tmp_path, 12, max_bytes=2500)
    (tmp_path / "key").write_bytes(KEY)
    files = [str(p) for p in rotated_files(tmp_path / "audit.jsonl")]

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "audit", "verify", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    anchor = ("--anchor", str(tmp_path / "audit.anchor"))
    key = ("--key", f"file:{tmp_path / 'key'}")
    r = cli(*reversed(files), *anchor, *key)
    assert r.returncode == 0 and r.stdout.startswith("intact: "), r.stdout
    assert "in the order of their events" in r.stdout
    r = cli(*files, *anchor)
    assert r.returncode == 3 and r.stdout.startswith("UNPROVEN: "), r.stdout
    env = {"PGVEIL_AUDIT_KEY": f"file:{tmp_path / 'key'}", "PATH": "/usr/bin:/bin"}
    assert cli(*files, *anchor, env=env).returncode == 0  # the key from the environment
    r = cli(*files[1:], *anchor, *key)
    assert r.returncode == 1 and r.stdout.startswith("BROKEN: begins after a gap"), r.stdout
    assert "rotated file(s) beside" in r.stdout
    r = cli(*files, *anchor, "--key", "not-a-reference-but-a-key-1234567890")
    assert r.returncode == 2 and "never given inline" in r.stderr
    assert "not-a-reference" not in r.stderr + r.stdout
    assert cli(str(tmp_path / "nope"), *key).returncode == 2


def test_canonical_line_of_a_sealed_event_verifies(tmp_path: Path) -> None:
    """A checkpoint's seal covers what its line says: reading it back and checking it
    gives the same answer as at writing."""
    write(tmp_path, 1)
    (cp,) = [e for e in events(tmp_path / "audit.jsonl") if e["type"] == CHECKPOINT]
    assert canonical({k: v for k, v in cp.items() if k != "hash"})
    assert cp["mac"] == mac(KEY, cp) and cp["every"] == EVERY and cp["chain"]


def test_a_key_given_later_seals_everything_before_it(tmp_path: Path) -> None:
    """Checkpoints written before the key was configured are unsealed; the first sealed
    one covers every event before it (a rebuild would change its `prev`)."""
    write(tmp_path, 7, key=None)
    assert check(tmp_path).exit_code == 3
    write(tmp_path, 2)
    r = check(tmp_path)
    assert r.exit_code == 0, r.lines()
    rebuild([tmp_path / "audit.jsonl"], drop=2)  # in the unsealed part
    assert "re-hashed" in kinds(check(tmp_path))


def test_unsealed_anchors_prove_nothing(tmp_path: Path) -> None:
    write(tmp_path, 7, key=None)
    r = check(tmp_path)
    assert any("anchors it reaches are not sealed" in u for u in r.unproven), r.unproven
    drop_lines(tmp_path / "audit.jsonl", -2)  # but a cut below them still shows
    assert kinds(check(tmp_path)) == ["truncated after anchor"]


def test_events_are_checkpointed_within_the_interval(tmp_path: Path) -> None:
    """Few events (far below `every`): the writer's timer seals them, so the window no
    anchor covers is bounded in time too."""

    async def go() -> list[str]:
        w = AuditWriter(
            [FileSink(tmp_path / "audit.jsonl")],
            key=KEY,
            anchor=tmp_path / "audit.anchor",
            checkpoint_every=1000,
            checkpoint_interval=0.2,
        )
        await w.start()
        task = asyncio.ensure_future(w.run())
        w.submit("access", {"tables": ["billing.customers"]})
        await asyncio.wait_for(w.checkpointed.wait(), 10)
        task.cancel()
        await w.close()  # nothing since: no shutdown checkpoint
        return [e["reason"] for e in events(tmp_path / "audit.anchor")]

    assert asyncio.run(go()) == ["interval"]
    assert check(tmp_path).exit_code == 0
