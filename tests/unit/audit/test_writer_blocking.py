"""The writer's `blocking` attribute (read for every chunk of an audited session) is
always what `blocks()` computes, and `recovered` (what a waiting session awaits) is set
exactly while it is off: a sink that fails and recovers changes all three alike."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from audit.sinks import FileSink
from audit.writer import AuditWriter


@pytest.mark.parametrize("on_failure", ["block", "drop"])
def test_blocking_follows_a_sink_that_fails_and_recovers(on_failure: str, tmp_path: Path) -> None:
    full = Path("/dev/full")  # every write fails with ENOSPC
    if not full.exists():
        pytest.fail("this test needs /dev/full (a Linux device that fails every write)")

    async def go() -> list[tuple[bool, bool, bool]]:
        sink = FileSink(tmp_path / "audit.jsonl")
        w = AuditWriter([sink], on_failure=on_failure)
        await w.start()
        seen = [(w.blocking, w.blocks(), not w.recovered.is_set())]
        w.batch_writes(asyncio.get_running_loop(), lambda actions: None)
        good = sink._file._f.fileno()  # (the open audit file)
        bad = os.open(full, os.O_WRONLY)
        saved = os.dup(good)
        os.dup2(bad, good)  # the file now fails every write
        try:
            w.submit("access", {"tables": ["t"]})
            w.release()  # (what the loop would run next: the events written, or not)
            seen.append((w.blocking, w.blocks(), not w.recovered.is_set()))
        finally:
            os.dup2(saved, good)
            os.close(saved)
            os.close(bad)
        w._flush(sink)  # type: ignore[attr-defined]  # (what run() does while it fails)
        seen.append((w.blocking, w.blocks(), not w.recovered.is_set()))
        await w.close()
        return seen

    seen = asyncio.run(go())
    assert all(attribute == computed == waits for attribute, computed, waits in seen), seen
    assert [attribute for attribute, _, _ in seen] == (
        [False, True, False] if on_failure == "block" else [False, False, False]
    )
