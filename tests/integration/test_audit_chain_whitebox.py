"""White-box attacks on the audit chain of a real proxy, beyond those of
tests/integration/test_audit_chain.py: an insider with write access to the audit
directory, who has read audit/resume.py and audit/verify.py."""

from __future__ import annotations

from pathlib import Path

from audit.files import rotated_files
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.test_audit_chain import files_of, start, verify, work
from tests.support import ProxyProcess


def test_every_file_and_the_anchor_file_removed_while_pgveil_is_down(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """pgveil finds neither an audit file nor an anchor file, and begins a new chain at a
    new genesis: intact on its own. The auditor's copy of the anchor file (shipped as it
    grew: it holds the old chain's checkpoints, then the new one's) shows that a chain was
    there whose events are gone."""
    d = tmp_path / "var"
    d.mkdir()
    shipped = tmp_path / "auditor.anchor"
    p = start(pg, d)
    try:
        work(pg, p, 8)
    finally:
        assert p.stop() == 0
    anchor = d / "audit.jsonl.anchor"
    shipped.write_bytes(anchor.read_bytes())
    for f in rotated_files(d / "audit.jsonl"):
        f.unlink()
    anchor.unlink()
    p = start(pg, d)
    try:
        work(pg, p, 4)
    finally:
        assert p.stop() == 0
    assert "Traceback" not in p.log(), p.log()
    with shipped.open("ab") as f:
        f.write(anchor.read_bytes())
    r = verify(*files_of(d), "--anchor", str(shipped))
    assert r.returncode == 1 and r.stdout.startswith("BROKEN: missing chain"), r.stdout
    # the anchor file beside it (which the insider rewrote) cannot tell
    r = verify(*files_of(d), "--anchor", str(anchor))
    assert r.returncode == 0, r.stdout
