"""The grammar table covers pglast's whole grammar, and the walk is closed by construction.

Every node class pglast can build is allowed (with every field classified), refused (with
the reason a masked role reads) or known never to come from the raw parser. Upgrading pglast
makes these tests fail until someone has looked at each new class and field.
"""

from __future__ import annotations

import inspect
from types import MappingProxyType

import pglast.ast
import pytest

from rules import grammar, reads
from rules.writes import Rewriter
from tests.unit.rules.fixtures import analyzer

_CLASSES = {
    name: cls
    for name, cls in vars(pglast.ast).items()
    if inspect.isclass(cls) and issubclass(cls, pglast.ast.Node) and cls is not pglast.ast.Node
}


def _slots(cls: type) -> set[str]:
    return set(cls.__slots__)


def test_every_node_class_is_classified_exactly_once() -> None:
    groups = {
        "allowed": set(grammar.ALLOWED),
        "refused": set(grammar.REFUSED),
        "not_raw": set(grammar.NOT_RAW),
    }
    for name in _CLASSES:
        homes = [g for g, members in groups.items() if name in members]
        assert len(homes) == 1, f"{name} is in {homes or 'no group'} of rules/grammar.py"
    for g, members in groups.items():
        stale = members - set(_CLASSES)
        assert not stale, f"rules/grammar.py lists {sorted(stale)} under {g}; pglast has none"


@pytest.mark.parametrize("name", sorted(grammar.ALLOWED))
def test_every_field_of_an_allowed_class_is_walked_or_explained(name: str) -> None:
    table = set(grammar.ALLOWED[name].fields)
    actual = _slots(_CLASSES[name])
    assert actual - table == set(), f"{name}: fields nobody classified: {sorted(actual - table)}"
    assert table - actual == set(), f"{name}: the table names fields pglast does not have"
    for field, rule in grammar.ALLOWED[name].fields.items():
        reason = rule.handler if isinstance(rule, grammar.Handled) else rule.reason
        assert reason and "\n" not in reason, f"{name}.{field} needs a one-line reason"


def test_handled_fields_name_a_handler_that_exists() -> None:
    for name, rule in grammar.ALLOWED.items():
        for field, kind in rule.fields.items():
            if isinstance(kind, grammar.Handled):
                method = kind.handler
                assert callable(getattr(Rewriter, method, None)), (
                    f"{name}.{field} is handled by {method}, which Rewriter lacks"
                )


def test_dispatched_classes_are_allowed_and_have_their_handler() -> None:
    for name, method in reads.HANDLERS.items():
        assert name in grammar.ALLOWED, name
        assert callable(getattr(Rewriter, method, None)), f"{name}: {method} missing"


def test_refusal_reasons_are_one_line_and_say_masked_roles() -> None:
    for name, reason in grammar.REFUSED.items():
        assert reason and "\n" not in reason, name
        assert "masked roles" in reason, name


# -- the walk refuses what the table does not know --------------------------------------------


def _without(name: str, field: str) -> MappingProxyType[str, grammar.NodeRule]:
    table = dict(grammar.ALLOWED)
    rule = table[name]
    fields = {k: v for k, v in rule.fields.items() if k != field}
    table[name] = grammar.NodeRule(MappingProxyType(fields), rule.since)
    return MappingProxyType(table)


def test_a_field_missing_from_the_table_refuses_the_statement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as if the grammar had grown the partition bound and nobody had classified it
    monkeypatch.setattr(grammar, "ALLOWED", _without("CreateStmt", "partbound"))
    d = analyzer().analyze("CREATE TEMP TABLE t PARTITION OF public.notes FOR VALUES IN (1)")
    assert d.action == "refuse"
    assert d.reason == "pgveil does not know the field partbound of CreateStmt"


def test_an_unset_field_missing_from_the_table_is_no_reason_to_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(grammar, "ALLOWED", _without("CreateStmt", "partbound"))
    assert analyzer().analyze("CREATE TEMP TABLE t (a int)").action == "pass"


def test_a_class_missing_from_the_table_refuses_the_statement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = dict(grammar.ALLOWED)
    del table["CoalesceExpr"]
    monkeypatch.setattr(grammar, "ALLOWED", MappingProxyType(table))
    d = analyzer().analyze("SELECT coalesce(1, 2)")
    assert d.action == "refuse"
    assert "CoalesceExpr" in (d.reason or "")


def test_a_node_where_the_table_expects_none_refuses_the_statement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as if WindowDef.startOffset held nothing but a flag: the expression in it is refused
    table = dict(grammar.ALLOWED)
    rule = table["WindowDef"]
    fields = dict(rule.fields)
    fields["startOffset"] = grammar.FLAG
    table["WindowDef"] = grammar.NodeRule(MappingProxyType(fields), rule.since)
    monkeypatch.setattr(grammar, "ALLOWED", MappingProxyType(table))
    d = analyzer().analyze(
        "SELECT sum(1) OVER (ORDER BY 1 ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)"
    )
    assert d.action == "refuse"
    assert d.reason == "pgveil does not expect an expression in WindowDef.startOffset"


def test_a_handler_that_skips_the_other_fields_refuses_the_statement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def lazy(self: Rewriter, node: object) -> object:
        return node  # never calls rest(): the arguments would go unanalysed

    monkeypatch.setattr(Rewriter, "function", lazy)
    d = analyzer().analyze("SELECT upper('x')")
    assert d.action == "refuse"
    assert "did not analyse every field of FuncCall" in (d.reason or "")


def test_newer_syntax_is_refused_on_older_servers() -> None:
    # JSON_ARRAY(...) is SQL/JSON syntax from PostgreSQL 16 on; to PostgreSQL 15 it is a
    # call of a function json_array, which anyone may have created
    d = analyzer().analyze("SELECT JSON_ARRAY(1, 2)")
    assert d.action == "refuse"
    assert "PostgreSQL 16" in (d.reason or "")
