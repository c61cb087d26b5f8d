"""`pgveil audit verify|tail`: the compliance team's tools over audit files.

Prints event metadata only (the events themselves never hold personal values).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from audit.files import AuditFileError, read_events, verify_files


def verify(paths: list[Path]) -> int:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        sys.stderr.write(f"pgveil: error: no such file: {missing[0]}\n")
        return 2
    try:
        total, brk, where = verify_files(paths)
    except AuditFileError as exc:
        print(f"BROKEN: {exc}")
        return 1
    if brk is not None:
        print(f"BROKEN: {where}: {brk}; {total} event(s) before it are intact")
        return 1
    print(f"intact: {total} event(s) in {len(paths)} file(s)")
    return 0


def line(e: Mapping[str, Any]) -> str:
    who = e.get("role", "")
    cls = e.get("classification", "")
    what = e.get("decision") or e.get("reason") or ""
    tables = ",".join(e.get("tables", []) or [])
    parts = [
        str(e.get("ts", "")),
        str(e.get("type", "")),
        f"{who}({cls})" if cls else who,
        tables,
        what,
    ]
    return "  ".join(p for p in parts if p)


def tail(path: Path, follow: bool, role: str | None, table: str | None) -> int:
    def wanted(e: Mapping[str, Any]) -> bool:
        if role is not None and e.get("role") != role:
            return False
        return table is None or table in (e.get("tables") or [])

    try:
        for e in read_events(path):
            if wanted(e):
                print(line(e))
        if not follow:
            return 0
        with path.open("rb") as f:
            f.seek(0, 2)
            while True:
                raw = f.readline()
                if not raw:
                    time.sleep(0.2)
                    continue
                e = json.loads(raw)
                if wanted(e):
                    print(line(e), flush=True)
    except AuditFileError as exc:
        sys.stderr.write(f"pgveil: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 0
