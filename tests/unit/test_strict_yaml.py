"""shared.strict_yaml: the one reading of pgveil's YAML files (rules, erasure configuration,
proxy configuration); each loader's own messages are pinned in its tests."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from shared.strict_yaml import StrictYaml

ROOT = Path(__file__).resolve().parents[2]


class Oops(Exception):
    pass


class Reader(StrictYaml):
    error = Oops


class KeyLines(Reader):
    KEY_LINES: ClassVar[bool] = True
    NULL_IS_A_VALUE: ClassVar[bool] = False


def _root(reader: StrictYaml, text: str) -> yaml.Node:
    node = reader.compose(text)
    assert node is not None
    return node


def test_unknown_key_names_file_line_path_and_what_is_allowed() -> None:
    r = Reader("f.yaml")
    top = r.mapping(_root(r, "a:\n  b: 1\n  c: 2\n"), "")
    with pytest.raises(Oops, match=r"^f.yaml:3 at 'a.c': unknown key 'c'; allowed: b, d$"):
        r.mapping(top["a"], "a", ("b", "d"))


def test_duplicate_keys_are_errors_at_every_depth() -> None:
    r = Reader("f.yaml")
    with pytest.raises(Oops, match=r"^f.yaml:4 at 'a\[0\].x': duplicate key$"):
        r.load("a:\n  - x: 1\n    y: 2\n    x: 3\n")
    assert Reader("f.yaml").load("a:\n  - x: 1\n    y: [2]\n") == {"a": [{"x": 1, "y": [2]}]}
    assert Reader("f.yaml").load("") is None


def test_shapes() -> None:
    r = Reader("f.yaml")
    top = r.mapping(_root(r, "l: [a, b]\ns: x\nn: 12\nm: {k: v}\nz:\n"), "")
    assert r.str_list(top["l"], "l") == ["a", "b"]
    assert r.scalar(top["z"], "z") == ""  # nothing: the empty text, unless NULL_IS_A_VALUE
    with pytest.raises(Oops, match="at 's': expected a list"):
        r.str_list(top["s"], "s")
    with pytest.raises(Oops, match="at 'm': expected a single value"):
        r.scalar(top["m"], "m")
    with pytest.raises(Oops, match="at 'n': expected a whole number from 0 to 10"):
        r.integer(top["n"], "n", 0, 10)
    with pytest.raises(Oops, match=r"at 's': expected a mapping$"):
        r.mapping(top["s"], "s")
    with pytest.raises(Oops, match="keys must be plain names"):
        r.mapping(_root(r, "[a]: 1\n"), "")
    k = KeyLines("f.yaml")
    ktop = k.mapping(_root(k, "z:\n"), "")
    with pytest.raises(Oops, match="at 'z': expected a single value"):
        k.scalar(ktop["z"], "z")


def test_errors_about_a_key_read_sit_on_its_line_with_key_lines() -> None:
    text = "a:\n  b:\n    - 1\n"
    for reader, line in ((Reader("f.yaml"), 3), (KeyLines("f.yaml"), 2)):
        top = reader.mapping(_root(reader, text), "")
        b = reader.mapping(top["a"], "a")["b"]
        with pytest.raises(Oops, match=rf"^f.yaml:{line} at 'a.b': no"):
            raise reader.fail(b, "a.b", "no")


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(Oops, match=r"^f.yaml:1: invalid YAML: mapping values are not allowed"):
        Reader("f.yaml").compose("a: b: c\n")


@pytest.mark.parametrize("module", ["rules/loader.py", "erasure/loader.py", "proxy/config.py"])
def test_each_loader_reads_yaml_through_the_strict_reader(module: str) -> None:
    """No loader parses YAML itself (a second reading would drift: duplicate keys let
    through, other messages)."""
    tree = ast.parse((ROOT / module).read_text())
    calls = {
        f"{n.func.value.id}.{n.func.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
    }
    assert not {"yaml.safe_load", "yaml.load", "yaml.compose"} & calls
    assert "StrictYaml" in {
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "shared.strict_yaml"
        for a in n.names
    }
