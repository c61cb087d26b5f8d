#!/usr/bin/env bash
# pgveil under Python 3.11, 3.12 and 3.13, built the same way: collect or build the
# interpreters, give each a venv with pgveil's dependencies, and measure (bench/README.md,
# "Interpreters").
#
# Usage: bench/interpreters.sh [--build-only] [--no-instructions] [--micro] [--tps]
#                              [--transactions N]
#
#   (default)       instructions per transaction (callgrind, load-independent): safe to run
#                   while the machine is busy
#   --no-instructions  skip those (with --micro or --tps on a quiet machine)
#   --micro         also CPU us per use of bench/prepared_micro.py (needs a quiet machine)
#   --tps           also `bench/run --only masked --reps 1 --duration 3` per interpreter
#                   (needs a quiet machine; tps on a 2-core machine are noisy)
#   --build-only    build the interpreters and venvs, measure nothing
#
# The interpreters:
#   - pyenv's, where $PYENV_ROOT/versions has them ($PYENV_VERSIONS, default
#     "3.11.7 3.12.1 3.13.0": the ones this kind of machine comes with). pyenv's python-build
#     configures every version alike (--enable-shared, CPython's default -O3, no PGO, no LTO),
#     which makes them a fair set; `pyenv install` cannot add one here (python.org is not
#     reachable), so a missing one is reported and left out.
#   - built here from the newest upstream source tarball that Debian's source archive holds
#     for each package in $DEBIAN_SOURCES (default "python3.13": Debian has no python3.12
#     source package any more), configured exactly as pyenv does (label VERSION-src), with a
#     private apt configuration (the machine's apt sources are not touched);
#   - the same without --enable-shared, for each package in $STATIC_SOURCES (default
#     "python3.13 python3.11", the latter bookworm's 3.11.2), labelled VERSION-static: from
#     3.12 on CPython keeps the current thread state in a thread-local variable, which a
#     shared libpython reaches through a call to __tls_get_addr and a static one directly.
#   - for reference, the system's own interpreters in $SYSTEM_PYTHONS (default
#     /usr/bin/python3.11: Debian's build, with Debian's flags), labelled VERSION-deb: how
#     much the way an interpreter is built matters beside its version.
# Everything lands in $PGVEIL_INTERP_DIR (default bench/out/interpreters, which git ignores).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${PGVEIL_INTERP_DIR:-$root/bench/out/interpreters}"
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
pyenv_versions="${PYENV_VERSIONS:-3.11.7 3.12.1 3.13.0}"
debian_sources="${DEBIAN_SOURCES:-python3.13}"
static_sources="${STATIC_SOURCES:-python3.13 python3.11}"
system_pythons="${SYSTEM_PYTHONS:-/usr/bin/python3.11}"
build_only=0 instr=1 micro=0 tps=0 transactions=200
while [[ $# -gt 0 ]]; do
    case "$1" in
        --build-only) build_only=1 ;;
        --no-instructions) instr=0 ;;
        --micro) micro=1 ;;
        --tps) tps=1 ;;
        --transactions) transactions="$2"; shift ;;
        *) echo "interpreters.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$work"/{src,prefix,venv,results}
say() { echo "interpreters.sh: $*" >&2; }

# --- the source builds -------------------------------------------------------------------
apt_dir="$work/apt"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
# the source index, read once (the list of suites is written after a successful update, so
# a changed or interrupted one is read again)
debian_index() {
    local want
    want="$(printf 'deb-src http://deb.debian.org/debian %s main\n' bookworm trixie sid)"
    [[ -f "$apt_dir/sources.list" && "$(cat "$apt_dir/sources.list")" == "$want" ]] && return 0
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    echo "$want" > "$apt_dir/sources.list.new"
    apt-get "${apt_opts[@]}" -o "Dir::Etc::SourceList=$apt_dir/sources.list.new" update -qq
    mv "$apt_dir/sources.list.new" "$apt_dir/sources.list"
}

# the upstream tarball (Debian's .orig.tar.xz) of the newest version of $1 whose files the
# archive still serves (an index can name a version a day before its files are there)
fetch_source() {
    local pkg="$1" v
    debian_index
    for v in $(apt-cache "${apt_opts[@]}" showsrc "$pkg" | sed -n 's/^Version: //p' | sort -rV); do
        if (cd "$work/src" && apt-get "${apt_opts[@]}" source -qq --download-only "$pkg=$v" \
                >/dev/null 2>&1); then
            ls "$work/src/${pkg}_${v%%-*}.orig.tar."* | head -1
            return 0
        fi
        say "$pkg $v: the archive does not serve its files, trying an older one"
    done
    return 1
}

# configure exactly as pyenv's python-build does, so that the source builds and pyenv's
# interpreters differ only in their version; $2 = static: the same without --enable-shared
build_python() {
    local tarball="$1" kind="$2" version prefix tree shared=(--enable-shared)
    version="$(basename "$tarball" | sed -E 's/^python3\.[0-9]+_([0-9.]+)\.orig.*/\1/')"
    prefix="$work/prefix/$version" tree="$work/src/$kind"
    if [[ $kind == static ]]; then prefix+="-static" shared=(); fi
    if [[ -x "$prefix/bin/python3" ]]; then echo "$prefix/bin/python3"; return 0; fi
    say "building Python $version ($kind) in $tree (about 10 minutes; nice -n 10, make -j2)"
    mkdir -p "$tree"
    rm -rf "$tree/Python-$version"
    tar -C "$tree" -xf "$tarball"
    (
        cd "$tree/Python-$version"
        nice -n 10 ./configure --prefix="$prefix" "${shared[@]}" --libdir="$prefix/lib" \
            LDFLAGS="-L$prefix/lib -Wl,-rpath,$prefix/lib" \
            LIBS="-L$prefix/lib -Wl,-rpath,$prefix/lib" CPPFLAGS="-I$prefix/include" \
            > "$tree/configure-$version.log" 2>&1
        nice -n 10 make -j2 > "$tree/make-$version.log" 2>&1
        nice -n 10 make install > "$tree/install-$version.log" 2>&1
    ) || { say "building Python $version failed: see $tree/*-$version.log"; return 1; }
    echo "$prefix/bin/python3"
}

# --- the interpreters and their venvs ---------------------------------------------------
declare -a labels=() pythons=()
for v in $pyenv_versions; do
    if [[ -x "$pyenv_root/versions/$v/bin/python3" ]]; then
        labels+=("$v"); pythons+=("$pyenv_root/versions/$v/bin/python3")
    else
        say "pyenv has no $v here ($pyenv_root/versions/$v): left out"
    fi
done
for kind in shared static; do
    if [[ $kind == shared ]]; then pkgs="$debian_sources" suffix=src
    else pkgs="$static_sources" suffix=static; fi
    for pkg in $pkgs; do
        if tarball="$(fetch_source "$pkg")" && python="$(build_python "$tarball" "$kind")"
        then
            labels+=("$("$python" -c 'import platform; print(platform.python_version())')-$suffix")
            pythons+=("$python")
        else
            say "no $kind source build of $pkg: left out"
        fi
    done
done
for python in $system_pythons; do
    if [[ -x "$python" ]] && "$python" -c 'import venv, ensurepip' 2>/dev/null; then
        labels+=("$("$python" -c 'import platform; print(platform.python_version())')-deb")
        pythons+=("$python")
    else
        say "$python is missing or cannot make a venv (Debian: apt-get install python3-venv): left out"
    fi
done
[[ ${#labels[@]} -gt 0 ]] || { say "no interpreter to measure"; exit 1; }

declare -a specs=()
for i in "${!labels[@]}"; do
    venv="$work/venv/${labels[$i]}"
    if [[ ! -x "$venv/bin/python" ]]; then
        say "venv $venv: pip install -e $root"
        "${pythons[$i]}" -m venv "$venv"
        nice -n 10 "$venv/bin/pip" install -q -e "$root" > "$work/venv/${labels[$i]}.pip.log" 2>&1 \
            || { say "pip install under ${labels[$i]} failed: see $work/venv/${labels[$i]}.pip.log"
                 rm -rf "$venv"; continue; }
    fi
    specs+=(--python "${labels[$i]}=$venv/bin/python")
done
[[ $build_only -eq 1 ]] && { printf '%s\n' "${specs[@]}"; exit 0; }

# --- measure -----------------------------------------------------------------------------
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
first="${specs[1]#*=}"
extra=()
[[ $instr -eq 0 ]] && extra+=(--no-instructions)
[[ $micro -eq 1 ]] && extra+=(--micro)
cd "$root"
if [[ $instr -eq 1 || $micro -eq 1 ]]; then
    # (niced: the counts do not move with load, and the machine may be busy with others)
    nice -n "$([[ $instr -eq 1 ]] && echo 10 || echo 0)" "$first" bench/interpreters.py \
        "${specs[@]}" --transactions "$transactions" "${extra[@]}" \
        --json "$work/results/$stamp.json" | tee "$work/results/$stamp.txt"
fi
if [[ $tps -eq 1 ]]; then
    for ((i = 1; i < ${#specs[@]}; i += 2)); do
        label="${specs[$i]%%=*}"
        echo; echo "== bench/run --only masked --reps 1 --duration 3 under $label"
        PYTHON="${specs[$i]#*=}" bench/run --only masked --reps 1 --duration 3 \
            | tee "$work/results/$stamp.tps-$label.txt"
    done
fi
