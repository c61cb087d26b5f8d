"""Reading a file a user named: a configuration, rules, a key, a certificate, an audit file.

Every pgveil command reads such files here, so that each says the same about one it cannot
read: `UnreadableFile`, whose text is one line that names the file, what it was for and the
problem (`rules.yaml: cannot read rules file: not UTF-8 text (line 3, byte 12 of the line)`;
no such file, a directory, permission denied), and that the command prints as
`pgveil: error: ...` (never a traceback). Text files are UTF-8, as
YAML requires.

Says nothing of what the file holds (it may be a key): a position, never a byte or a line.
Blocking I/O, for the command line and start-up only, never the data path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# what the common errors mean to a person (strerror is "[Errno 21] Is a directory" style)
_PROBLEMS = {
    errno.ENOENT: "no such file",
    errno.EISDIR: "is a directory, not a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.ELOOP: "too many symbolic links",
}


class UnreadableFile(Exception):
    """A file a user named cannot be read; the text is one line, safe to print."""

    def __init__(self, path: str | os.PathLike[str], what: str, problem: str) -> None:
        super().__init__(f"{path}: cannot read {what}: {problem}")
        self.path = str(path)
        self.what = what
        self.problem = problem


def problem_of(exc: OSError) -> str:
    """What an OSError from opening or reading a file means, in a few words."""
    if exc.errno in _PROBLEMS:
        return _PROBLEMS[exc.errno]
    return exc.strerror or type(exc).__name__


def read_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    """The file's bytes. `what` names its role for the message (`the rules file`)."""
    try:
        if Path(path).is_dir():  # (open() of a directory fails only when reading, or not)
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UnreadableFile(path, what, problem_of(exc)) from exc


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The file's text, UTF-8; a file that is not is unreadable, with the line and column
    of the first byte that is not."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UnreadableFile(
            path, what, f"not UTF-8 text (line {line}, byte {column} of the line)"
        ) from exc


def check_readable(path: str | os.PathLike[str], what: str) -> None:
    """That the file can be opened for reading (for a file that a library opens itself,
    such as a certificate for the ssl module, or that is read line by line later)."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            # a FIFO or a device: opening it to check would wait for a writer and then, closed
            # again, break that writer's pipe (`audit who --file <(...)`); its mode tells
            if not os.access(path, os.R_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UnreadableFile(path, what, problem_of(exc)) from exc
