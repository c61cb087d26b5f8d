"""Strict reading of pgveil's YAML files (rules, erasure configuration, proxy
configuration): one place that says what a malformed file is and how the error reads.

Every error names the file, the line and the key path (`rules.yaml:3 at 'tables.s.t':
duplicate key`) and says what is allowed: a key the format does not know, a key given
twice, a value of the wrong shape (a mapping, a list, a single value, a whole number). A
loader subclasses `StrictYaml`, sets the exception it raises, and adds what its own format
needs; its class attributes keep its messages as they were.

Pure: parses text it is given; reads no file, no environment.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import yaml

NULL_TAG = "tag:yaml.org,2002:null"


class StrictYaml:
    """Reads one document of `source` (the file name errors start with)."""

    error: ClassVar[type[Exception]] = ValueError
    EXPECTED_MAPPING: ClassVar[str] = "expected a mapping"
    DUPLICATE_KEY: ClassVar[str] = "duplicate key"
    NULL_IS_A_VALUE: ClassVar[bool] = True  # `key:` (nothing) is the empty text
    # an error at a key already read is placed on that key's line (else on its value's)
    KEY_LINES: ClassVar[bool] = False

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}  # the line of each key path read so far

    # -- errors ---------------------------------------------------------------------------

    def fail(self, node: yaml.Node | None, path: str, message: str) -> Exception:
        """An error at `path`, on `node`'s line (or on its key's, see KEY_LINES)."""
        if self.KEY_LINES and path in self.lines:
            return self.fail_at(path, message)
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        where = f" at '{path}'" if path else ""
        return self.error(f"{self.source}{line}{where}: {message}")

    def fail_at(self, path: str, message: str) -> Exception:
        """An error about a key already read: its line (or its nearest parent's)."""
        probe = path
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = f":{self.lines[probe]}" if probe in self.lines else ""
        return self.error(f"{self.source}{line} at '{path}': {message}")

    # -- reading --------------------------------------------------------------------------

    def compose(self, text: str) -> yaml.Node | None:
        """The document's node tree (None for an empty document); YAML syntax errors name
        the line."""
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise self.invalid_yaml(line, getattr(exc, "problem", None) or exc) from exc

    def invalid_yaml(self, line: int | None, problem: object) -> Exception:
        """The error for text that is no YAML (the parser's problem says why)."""
        at = f":{line}" if line is not None else ""
        return self.error(f"{self.source}{at}: invalid YAML: {problem}")

    def entries(
        self, node: yaml.Node, path: str, allowed: tuple[str, ...] | None = None
    ) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """A mapping's (key, key node, value node), in order: keys are plain names, each
        given once, and (when `allowed` is given) one of `allowed`."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, path, self.EXPECTED_MAPPING)
        out: list[tuple[str, yaml.Node, yaml.Node]] = []
        seen: set[str] = set()
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise self.fail(k, path, "keys must be plain names")
            key = str(k.value)
            sub = f"{path}.{key}" if path else key
            if key in seen:
                raise self.fail(k, sub, self.DUPLICATE_KEY)
            seen.add(key)
            if allowed is not None and key not in allowed:
                raise self.fail(k, sub, f"unknown key '{key}'; allowed: {', '.join(allowed)}")
            self.lines[sub] = k.start_mark.line + 1
            out.append((key, k, v))
        return out

    def mapping(
        self, node: yaml.Node, path: str, allowed: tuple[str, ...] | None = None
    ) -> dict[str, yaml.Node]:
        """`entries` as key -> value node."""
        return {key: v for key, _, v in self.entries(node, path, allowed)}

    def scalar(self, node: yaml.Node, path: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or (
            not self.NULL_IS_A_VALUE and node.tag == NULL_TAG
        ):
            raise self.fail(node, path, "expected a single value")
        return str(node.value)

    def str_list(self, node: yaml.Node, path: str) -> list[str]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, path, "expected a list, e.g. [a, b]")
        return [self.scalar(item, f"{path}[{i}]") for i, item in enumerate(node.value)]

    def integer(self, node: yaml.Node, path: str, lo: int = 0, hi: int = 1000) -> int:
        text = self.scalar(node, path)
        if not re.fullmatch(r"\d+", text) or not lo <= int(text) <= hi:
            raise self.fail(node, path, f"expected a whole number from {lo} to {hi}")
        return int(text)

    def unique_keys(self, node: yaml.Node, path: str = "") -> None:
        """Every mapping under `node` gives each key once (checked all the way down)."""
        if isinstance(node, yaml.MappingNode):
            for key, _, v in self.entries(node, path):
                self.unique_keys(v, f"{path}.{key}" if path else key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.unique_keys(item, f"{path}[{i}]")

    def load(self, text: str) -> Any:
        """The document as Python values (as yaml.safe_load), a key given twice anywhere
        being an error rather than the last one winning."""
        node = self.compose(text)
        if node is None:
            return None
        self.unique_keys(node)
        return yaml.SafeLoader("").construct_document(node)
