"""The validated, immutable masking policy that a rules file describes.

Built only by `rules.loader`; read by the analyser, the proxy and the audit. Holds secrets
(keyed-mask keys) as bytes that must never be logged, printed or put in an error message:
`Policy.__repr__` leaves them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Classification = Literal["masked", "unmasked"]


@dataclass(frozen=True)
class MaskSpec:
    """One mask with its parameters. For `json`, `keys` maps dotted paths to masks."""

    name: str
    keep_first: int = 1
    keep_last: int = 1
    char: str = "*"
    value: str = "redacted"
    key: str = "hash"
    truncate: str = "month"
    keys: Mapping[str, MaskSpec] = field(default_factory=dict)

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class TableRule:
    schema: str
    name: str
    subject: str | None
    columns: Mapping[str, MaskSpec]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class ChannelRule:
    name: str
    payload: Literal["json", "text"]
    keys: Mapping[str, MaskSpec]
    mask: MaskSpec | None  # for text payloads


@dataclass(frozen=True)
class Policy:
    unmasked_roles: frozenset[str]
    masked_roles: frozenset[str]
    default: Classification
    allowed_functions: frozenset[tuple[str, str]]
    channels: Mapping[str, ChannelRule]
    tables: Mapping[tuple[str, str], TableRule]
    keys: Mapping[str, bytes] = field(repr=False)
    version: str = ""
    source: Path | None = None
    # the databases the table rules are for (`databases:`); None: every database
    databases: tuple[str, ...] | None = None

    def classify(self, roles: set[str] | frozenset[str]) -> Classification:
        """Classification of a login given itself and every role it belongs to
        (transitively): masked if any of them is listed as masked; unmasked if any is
        listed as unmasked; otherwise the default."""
        if roles & self.masked_roles:
            return "masked"
        if roles & self.unmasked_roles:
            return "unmasked"
        return self.default

    def table(self, schema: str, name: str) -> TableRule | None:
        return self.tables.get((schema, name))

    def covers(self, database: str) -> bool:
        """Whether the rules are for this database (masked roles may use it)."""
        return self.databases is None or database in self.databases
