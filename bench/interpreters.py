"""pgveil's proxy under several Python interpreters: instructions per transaction (callgrind,
load-independent) and CPU microseconds per prepared-statement use, so that what moving from
Python 3.11 to 3.12 or 3.13 gives a user is measured rather than guessed.

Each interpreter is a venv's python with pgveil's dependencies installed (bench/interpreters.sh
builds the interpreters and the venvs). Every interpreter runs this checkout's code
(PYTHONPATH), against one embedded PostgreSQL loaded once, with the same helpdesk script,
transactions and random seed as bench/instructions.py; the interpreters take turns within
each configuration, so nothing but the interpreter differs between the columns.

It measures; it does not judge. Instruction counts are not time: a newer interpreter may
retire the same instructions in fewer or more cycles, which is why --micro also reports CPU
time per use (bench/prepared_micro.py, in turn per interpreter), and that number moves with
the machine's load.

Usage: python bench/interpreters.py --python LABEL=PATH [--python LABEL=PATH ...]
                                    [--transactions N] [--config ROLE/MODE/AUDIT ...]
                                    [--micro] [--micro-rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # (the script's own folder is first)

import instructions

import bench as b

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    f"{role}/{mode}/{audit}"
    for role in ("unmasked", "masked")
    for mode in ("simple", "extended")
    for audit in ("audited", "no-audit")
]
_PROBE = (
    "import json, sys, sysconfig, asyncpg, pglast, uvloop, orjson; "
    "print(json.dumps({'version': sys.version.split()[0], "
    "'config_args': sysconfig.get_config_var('CONFIG_ARGS') or '', "
    "'opt': sysconfig.get_config_var('OPT') or '', "
    "'asyncpg': asyncpg.__version__, 'pglast': pglast.__version__, "
    "'uvloop': uvloop.__version__, 'orjson': orjson.__version__}))"
)


def probe(python: str) -> dict[str, str]:
    """The interpreter's version and build flags, and its dependencies' versions; a loud error
    if it lacks a dependency (a column measured without, say, uvloop would mislead)."""
    done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise b.BenchError(f"{python} lacks pgveil's dependencies: {done.stderr.strip()[-300:]}")
    info: dict[str, str] = json.loads(done.stdout)
    args = info["config_args"]
    info["build"] = (
        ", ".join(
            flag
            for flag in ("--enable-optimizations", "--with-lto", "--enable-experimental-jit")
            if flag in args
        )
        or "configure: no --enable-optimizations, no --with-lto"
    )
    return info


def micro(pythons: dict[str, str], rounds: int, seconds: float, audited: bool) -> dict[str, float]:
    """Median CPU microseconds per use of bench/prepared_micro.py per interpreter, the
    interpreters taking turns round by round so that a change in the machine's load falls on
    all of them alike."""
    samples: dict[str, list[float]] = {label: [] for label in pythons}
    for _ in range(rounds):
        for label, python in pythons.items():
            argv = [python, str(ROOT / "bench" / "prepared_micro.py"), "--reps", "1",
                    "--seconds", str(seconds)] + (["--audited"] if audited else [])  # fmt: skip
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            found = re.search(r"([\d.]+) us per use", out)
            if found is None:
                raise b.BenchError(f"prepared_micro under {label}: {out[-300:]}")
            samples[label].append(float(found.group(1)))
    return {label: statistics.median(values) for label, values in samples.items()}


_CPYTHON = re.compile(r"^(lib)?python3(\.\d+)?(\.so.*)?$")
PARTS = ("CPython: gc", "CPython: the rest", "extension modules", "libc, ld.so, libm", "other")
_NAME_KINDS = {
    "ob": "ob", "cob": "ob",
    "fl": "fl", "fi": "fl", "fe": "fl", "cfi": "fl", "cfl": "fl",
    "fn": "fn", "cfn": "fn",
}  # fmt: skip


def self_costs(callgrind_out: Path) -> dict[tuple[str, str, str], int]:
    """Self instructions per (object, source file, function) of a callgrind profile, read
    from the file itself (callgrind_annotate loses the object of many functions): cost lines
    count for the current function, except the line after `calls=`, which is the inclusive
    cost of a call; `(id) name` defines a compressed name, `(id)` alone reuses it."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fl": {}, "fn": {}}
    costs: dict[tuple[str, str, str], int] = {}
    ob = fl = fn = file = ""
    after_calls = False
    with callgrind_out.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            if line[0].isdigit() or line[0] in "+-*":
                if after_calls:
                    after_calls = False
                    continue
                fields = line.split()
                if len(fields) >= 2:
                    key = (ob, file, fn)
                    costs[key] = costs.get(key, 0) + int(fields[1])
                continue
            key, sep, rest = line.partition("=")
            if not sep:
                continue
            if key == "calls":
                after_calls = True
                continue
            kind = _NAME_KINDS.get(key)
            if kind is None:
                continue
            rest = rest.strip()
            if rest.startswith("("):
                ident, _, name = rest[1:].partition(")")
                name = name.strip()
                if name:
                    names[kind][ident] = name
                else:
                    name = names[kind].get(ident, "?")
            else:
                name = rest
            if key == "ob":
                ob = name
            elif key == "fl":
                fl = file = name
            elif key in ("fi", "fe"):
                file = name
            elif key == "fn":
                fn, file = name, fl
    return costs


def breakdown(callgrind_out: Path) -> dict[str, int]:
    """Self instructions of a callgrind profile by where they ran: CPython's cyclic garbage
    collector (gcmodule.c, gc.c and the types' traverse and visit functions it calls; where
    CPython's symbols are stripped, as in Debian's executable, it cannot be told apart and
    counts as the rest), the rest of CPython (libpython, or the executable where it is
    linked statically, as Debian's is), extension modules (uvloop with its libuv, pglast
    with libpg_query, asyncpg, orjson, the standard library's C modules), the C library,
    and anything else (libcrypto's SHA-256 among it)."""
    parts = dict.fromkeys(PARTS, 0)
    for (obj, file, function), ir in self_costs(callgrind_out).items():
        name = obj.rsplit("/", 1)[-1]
        if _CPYTHON.match(name):
            function = function.split("'", 1)[0]  # (callgrind marks recursion levels: f'2)
            gc = (
                file.endswith(("gcmodule.c", "/gc.c"))
                or function.endswith("_traverse")
                or function.startswith("visit_")
            )
            parts["CPython: gc" if gc else "CPython: the rest"] += ir
        elif "site-packages/" in obj or "lib-dynload/" in obj:
            parts["extension modules"] += ir
        elif name.startswith(("libc.", "libc-", "ld-linux", "libm.", "libm-")):
            parts["libc, ld.so, libm"] += ir
        else:
            parts["other"] += ir
    return parts


def _count_once_more_if_stopped(
    db: b.EmbeddedPostgres,
    workdir: Path,
    rules: Path,
    script: Path,
    ns: argparse.Namespace,
    python: str,
    label: str,
) -> tuple[int, dict[str, int]]:
    """instructions.count, tried a second time if the first run failed: on a machine shared
    with others a proxy has been seen stopped mid-run by a signal that was not ours (its
    sessions ended with 57P01), and one such run should not throw away the other counts.
    The failure is printed, and a second one is raised. Returns the total and its
    breakdown()."""
    try:
        total = instructions.count(db, workdir, ROOT, rules, script, ns, python=python, label=label)
    except b.BenchError as e:
        print(f"  {label}: failed ({str(e).strip()[-200:]}); once more", flush=True)
        total = instructions.count(db, workdir, ROOT, rules, script, ns, python=python, label=label)
    return total, breakdown(workdir / f"callgrind.{label}.out")


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--python",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="an interpreter to measure (the first is the baseline of the ratios)",
    )
    p.add_argument("--transactions", type=int, default=200)
    p.add_argument("--config", action="append", choices=CONFIGS,
                   help="role/mode/audit to count (default: all eight)")  # fmt: skip
    p.add_argument("--no-instructions", action="store_true", help="skip the callgrind counts")
    p.add_argument("--micro", action="store_true", help="also CPU us per use (prepared_micro)")
    p.add_argument("--micro-rounds", type=int, default=5)
    p.add_argument("--micro-seconds", type=float, default=3.0)
    p.add_argument("--json", type=Path, help="write the results here as well")
    args = p.parse_args(argv)

    pythons: dict[str, str] = {}
    for spec in args.python:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            p.error(f"--python wants LABEL=PATH, not {spec!r}")
        if label in pythons:
            p.error(f"--python {label} given twice")
        pythons[label] = path
    infos = {label: probe(python) for label, python in pythons.items()}
    base = next(iter(pythons))
    result: dict[str, object] = {"interpreters": infos, "transactions": args.transactions}

    print("interpreters:")
    for label, info in infos.items():
        print(f"  {label}: Python {info['version']} ({info['build']}; OPT {info['opt']!r}); "
              f"asyncpg {info['asyncpg']}, pglast {info['pglast']}, uvloop {info['uvloop']}, "
              f"orjson {info['orjson']}")  # fmt: skip

    if not args.no_instructions:
        for binary in ("valgrind", "callgrind_control", "callgrind_annotate"):
            if shutil.which(binary) is None:
                print(f"interpreters: {binary} is not installed (apt-get install valgrind)",
                      file=sys.stderr)  # fmt: skip
                return 2
        counts: dict[str, dict[str, int]] = {}
        parts: dict[str, dict[str, dict[str, int]]] = {}
        with contextlib.ExitStack() as stack:
            workdir = Path(tempfile.mkdtemp(prefix="pgveil-interpreters-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            db = b.EmbeddedPostgres(settings={"max_connections": "100"})
            stack.callback(db.cleanup)
            db.start()
            b.load_billing(db)
            rules, script = b.write_helpdesk_files(workdir)
            for config in args.config or CONFIGS:
                role, mode, audit = config.split("/")
                ns = argparse.Namespace(
                    transactions=args.transactions,
                    mode=mode,
                    role=role,
                    no_audit=audit == "no-audit",
                )
                counts[config] = {}
                parts[config] = {}
                for label, python in pythons.items():
                    total, parts[config][label] = _count_once_more_if_stopped(
                        db, workdir, rules, script, ns, python, f"{label}-{role}-{mode}-{audit}"
                    )
                    counts[config][label] = total
                    print(f"  {config} {label}: {total / args.transactions / 1000:.0f} k",
                          flush=True)  # fmt: skip
        result["instructions"] = counts
        result["instructions_by_part"] = parts
        head = ["role / -M / audit", *(f"{lbl} (k)" for lbl in pythons)]
        head += [f"{lbl}/{base}" for lbl in pythons if lbl != base]
        rows = []
        for config, by in counts.items():
            row = [config.replace("/", " / ")]
            row += [f"{by[lbl] / args.transactions / 1000:.0f}" for lbl in pythons]
            row += [f"{by[lbl] / by[base]:.2f}" for lbl in pythons if lbl != base]
            rows.append(row)
        print(f"\nk instructions per transaction of the helpdesk script (callgrind, "
              f"{args.transactions} transactions, -c 1):")  # fmt: skip
        print(_table(head, rows))
        print("\nwhere they ran, k instructions per transaction (self cost by object):")
        head = ["role / -M / audit", "part", *pythons]
        rows = []
        for config, by in parts.items():
            for part in PARTS:
                row = [config.replace("/", " / "), part]
                row += [f"{by[lbl][part] / args.transactions / 1000:.0f}" for lbl in pythons]
                rows.append(row)
        print(_table(head, rows))

    if args.micro:
        micros = {
            kind: micro(pythons, args.micro_rounds, args.micro_seconds, kind == "audited")
            for kind in ("plain", "audited")
        }
        result["micro_us"] = micros
        head = ["prepared_micro", *(f"{lbl} (us)" for lbl in pythons)]
        head += [f"{lbl}/{base}" for lbl in pythons if lbl != base]
        rows = []
        for kind, by in micros.items():
            row = [kind, *(f"{by[lbl]:.2f}" for lbl in pythons)]
            row += [f"{by[lbl] / by[base]:.2f}" for lbl in pythons if lbl != base]
            rows.append(row)
        load = os.getloadavg()[0]
        print(
            f"\nCPU us per masked Bind/Execute/Sync use (median of {args.micro_rounds} rounds"
            f" x {args.micro_seconds} s, interpreters in turn; load {load:.2f}):"
        )
        print(_table(head, rows))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
