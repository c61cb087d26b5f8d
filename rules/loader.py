"""Reads a rules file into a `Policy`, strictly.

Every error names the file, the line, the key path and what is allowed: an unknown key, an
unknown mask, a bad parameter, a missing secret. Nothing is defaulted silently except what
the format documents (`roles.default: masked`, mask parameter defaults). Secrets come from
the environment or a file, never from the rules file itself, and never appear in errors.
This module reads files and environment variables; it does no other I/O.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rules.masks import MASK_NAMES, MASK_PARAMS
from rules.model import ChannelRule, MaskSpec, Policy, TableRule
from shared import user_files
from shared.strict_yaml import StrictYaml

TOP_KEYS = ("databases", "roles", "keys", "functions", "channels", "tables")
MIN_KEY_BYTES = 16


class RulesError(Exception):
    """A rules file is invalid; the message is safe to print (no secrets, no values)."""


class RulesUnreadable(RulesError):
    """The rules file, or a key file it names, cannot be read (shared.user_files): the
    message is one line that names the file and the problem."""


class _Ctx(StrictYaml):
    error = RulesError


def load_rules(path: Path, environ: Mapping[str, str] | None = None) -> Policy:
    try:
        text = user_files.read_text(path, "rules file")
    except user_files.UnreadableFile as exc:
        raise RulesUnreadable(str(exc)) from exc
    return parse_rules(text, str(path), environ, source=path)


def parse_rules(
    text: str,
    name: str = "<rules>",
    environ: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Policy:
    environ = os.environ if environ is None else environ
    ctx = _Ctx(name)
    root = ctx.compose(text)
    if root is None:
        raise RulesError(f"{name}: the rules file is empty; it needs at least 'tables'")
    sections = {k: v for k, _, v in ctx.entries(root, "", TOP_KEYS)}
    if "tables" not in sections:
        raise ctx.fail(root, "", "missing 'tables': which columns are personal")

    databases: tuple[str, ...] | None = None
    if "databases" in sections:
        node = sections["databases"]
        names = ctx.str_list(node, "databases")
        if not names:
            raise ctx.fail(
                node, "databases", "expected at least one database; leave the key out for all"
            )
        for i, db in enumerate(names):
            item = node.value[i]
            if not db:
                raise ctx.fail(item, f"databases[{i}]", "expected a database name")
            if db in names[:i]:
                raise ctx.fail(item, f"databases[{i}]", f"database {db} is listed twice")
        databases = tuple(names)

    unmasked: list[str] = []
    masked: list[str] = []
    default = "masked"
    if "roles" in sections:
        for key, _k, v in ctx.entries(
            sections["roles"], "roles", ("unmasked", "masked", "default")
        ):
            if key == "default":
                default = ctx.scalar(v, "roles.default")
                if default not in ("masked", "unmasked"):
                    raise ctx.fail(v, "roles.default", "expected 'masked' or 'unmasked'")
            elif key == "unmasked":
                unmasked = ctx.str_list(v, "roles.unmasked")
            else:
                masked = ctx.str_list(v, "roles.masked")
    both = set(unmasked) & set(masked)
    if both:
        raise ctx.fail(
            sections["roles"], "roles", f"roles listed as both masked and unmasked: {sorted(both)}"
        )

    keys: dict[str, bytes] = {}
    if "keys" in sections:
        for key, _k, v in ctx.entries(sections["keys"], "keys"):
            keys[key] = _secret(ctx, v, f"keys.{key}", environ)

    functions: set[tuple[str, str]] = set()
    if "functions" in sections:
        for _key, _k, v in ctx.entries(sections["functions"], "functions", ("allow",)):
            for i, fn in enumerate(ctx.str_list(v, "functions.allow")):
                schema, _, fname = fn.rpartition(".")
                if not schema or not fname:
                    raise ctx.fail(v, f"functions.allow[{i}]", "expected schema.function")
                functions.add((schema, fname))

    channels: dict[str, ChannelRule] = {}
    if "channels" in sections:
        for chan, _k, v in ctx.entries(sections["channels"], "channels"):
            channels[chan] = _channel(ctx, v, f"channels.{chan}", keys)

    tables: dict[tuple[str, str], TableRule] = {}
    for qname, knode, v in ctx.entries(sections["tables"], "tables"):
        schema, _, tname = qname.rpartition(".")
        if not schema:
            raise ctx.fail(knode, f"tables.{qname}", "table names must be schema-qualified")
        rule = _table(ctx, v, f"tables.{qname}", schema, tname, keys)
        tables[(schema, tname)] = rule

    version = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Policy(
        unmasked_roles=frozenset(unmasked),
        masked_roles=frozenset(masked),
        default="masked" if default == "masked" else "unmasked",
        allowed_functions=frozenset(functions),
        channels=channels,
        tables=tables,
        keys=keys,
        version=version,
        source=source,
        databases=databases,
    )


def _secret(ctx: _Ctx, node: yaml.Node, path: str, environ: Mapping[str, str]) -> bytes:
    items = {k: (kn, v) for k, kn, v in ctx.entries(node, path, ("env", "file"))}
    if len(items) != 1:
        raise ctx.fail(node, path, "give exactly one of 'env' or 'file'")
    ((kind, (_kn, v)),) = items.items()
    ref = ctx.scalar(v, f"{path}.{kind}")
    if kind == "env":
        if ref not in environ:
            raise ctx.fail(v, f"{path}.env", f"environment variable {ref} is not set")
        secret = environ[ref].encode()
    else:
        try:
            secret = user_files.read_bytes(ref, "key file").strip()
        except user_files.UnreadableFile as exc:
            # the rules file's line, and the key file's name and problem
            where = ctx.fail(v, f"{path}.file", f"cannot read key file {ref}: {exc.problem}")
            raise RulesUnreadable(str(where)) from exc
    if len(secret) < MIN_KEY_BYTES:
        raise ctx.fail(v, path, f"the key must be at least {MIN_KEY_BYTES} bytes long")
    return secret


def _mask(ctx: _Ctx, node: yaml.Node, path: str, keys: Mapping[str, bytes]) -> MaskSpec:
    if isinstance(node, yaml.ScalarNode):
        name = str(node.value)
        params: dict[str, Any] = {}
        param_nodes: dict[str, yaml.Node] = {}
    else:
        entries = ctx.entries(node, path)
        given = {k: v for k, _kn, v in entries}
        if "mask" not in given:
            raise ctx.fail(node, path, "a mask mapping needs 'mask', e.g. {mask: partial}")
        name = ctx.scalar(given.pop("mask"), f"{path}.mask")
        param_nodes = given
        params = {}
    if name not in MASK_NAMES:
        raise ctx.fail(node, path, f"unknown mask '{name}'; masks: {', '.join(MASK_NAMES)}")
    allowed = MASK_PARAMS[name]
    for key, pnode in param_nodes.items():
        if key not in allowed:
            choices = ", ".join(sorted(allowed)) or "none"
            raise ctx.fail(
                pnode,
                f"{path}.{key}",
                f"mask '{name}' has no parameter '{key}'; parameters: {choices}",
            )
        p = f"{path}.{key}"
        if key in ("keep_first", "keep_last"):
            params[key] = ctx.integer(pnode, p, 0, 100)
        elif key == "char":
            ch = ctx.scalar(pnode, p)
            if len(ch) != 1:
                raise ctx.fail(pnode, p, "expected a single character")
            params[key] = ch
        elif key == "value":
            params[key] = ctx.scalar(pnode, p)
        elif key == "key":
            ref = ctx.scalar(pnode, p)
            if ref not in keys:
                raise ctx.fail(pnode, p, f"no key '{ref}' under 'keys'")
            params[key] = ref
        elif key == "truncate":
            tr = ctx.scalar(pnode, p)
            if tr not in ("year", "month"):
                raise ctx.fail(pnode, p, "expected 'year' or 'month'")
            params[key] = tr
        elif key == "keys":
            params[key] = _json_keys(ctx, pnode, p, keys)
    if name == "digits":
        params.setdefault("keep_last", 4)
    if name == "hash" and params.get("key", "hash") not in keys:
        raise ctx.fail(node, path, "mask 'hash' needs a key: add 'keys: {hash: {env: VAR}}'")
    if name == "json" and not params.get("keys"):
        raise ctx.fail(node, path, "mask 'json' needs 'keys': which keys to mask")
    return MaskSpec(name=name, **params)


def _json_keys(
    ctx: _Ctx, node: yaml.Node, path: str, keys: Mapping[str, bytes]
) -> dict[str, MaskSpec]:
    out: dict[str, MaskSpec] = {}
    for key, _kn, v in ctx.entries(node, path):
        if not key or any(not part for part in key.split(".")):
            raise ctx.fail(
                v, f"{path}.{key}", "expected a key or a dotted path, e.g. address.street"
            )
        spec = _mask(ctx, v, f"{path}.{key}", keys)
        if spec.name == "json":
            raise ctx.fail(v, f"{path}.{key}", "use a dotted path instead of a nested json mask")
        out[key] = spec
    return out


def _channel(ctx: _Ctx, node: yaml.Node, path: str, keys: Mapping[str, bytes]) -> ChannelRule:
    given = {k: v for k, _kn, v in ctx.entries(node, path, ("payload", "keys", "mask"))}
    payload = ctx.scalar(given["payload"], f"{path}.payload") if "payload" in given else "json"
    if payload not in ("json", "text"):
        raise ctx.fail(node, f"{path}.payload", "expected 'json' or 'text'")
    if payload == "json":
        if "mask" in given:
            raise ctx.fail(given["mask"], f"{path}.mask", "json payloads take 'keys', not 'mask'")
        jkeys = _json_keys(ctx, given["keys"], f"{path}.keys", keys) if "keys" in given else {}
        return ChannelRule(path.split(".", 1)[1], "json", jkeys, None)
    if "keys" in given:
        raise ctx.fail(given["keys"], f"{path}.keys", "text payloads take 'mask', not 'keys'")
    mask = (
        _mask(ctx, given["mask"], f"{path}.mask", keys) if "mask" in given else MaskSpec("partial")
    )
    return ChannelRule(path.split(".", 1)[1], "text", {}, mask)


def _table(
    ctx: _Ctx, node: yaml.Node, path: str, schema: str, name: str, keys: Mapping[str, bytes]
) -> TableRule:
    given = {k: v for k, _kn, v in ctx.entries(node, path, ("subject", "columns"))}
    subject = ctx.scalar(given["subject"], f"{path}.subject") if "subject" in given else None
    if "columns" not in given:
        raise ctx.fail(node, path, "missing 'columns': which columns are personal")
    columns: dict[str, MaskSpec] = {}
    for col, _kn, v in ctx.entries(given["columns"], f"{path}.columns"):
        columns[col] = _mask(ctx, v, f"{path}.columns.{col}", keys)
    return TableRule(schema=schema, name=name, subject=subject, columns=columns)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the rules format, for editors (`pgveil rules schema`)."""
    mask_names = {"enum": list(MASK_NAMES)}
    mask_obj: dict[str, Any] = {
        "type": "object",
        "required": ["mask"],
        "additionalProperties": False,
        "properties": {
            "mask": mask_names,
            "keep_first": {"type": "integer", "minimum": 0, "maximum": 100},
            "keep_last": {"type": "integer", "minimum": 0, "maximum": 100},
            "char": {"type": "string", "minLength": 1, "maxLength": 1},
            "value": {"type": "string"},
            "key": {"type": "string"},
            "truncate": {"enum": ["year", "month"]},
            "keys": {"type": "object", "additionalProperties": {"$ref": "#/$defs/mask"}},
        },
    }
    secret = {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 1,
        "properties": {"env": {"type": "string"}, "file": {"type": "string"}},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pgveil rules",
        "type": "object",
        "additionalProperties": False,
        "required": ["tables"],
        "$defs": {"mask": {"oneOf": [mask_names, mask_obj]}},
        "properties": {
            "databases": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "uniqueItems": True,
            },
            "roles": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "unmasked": {"type": "array", "items": {"type": "string"}},
                    "masked": {"type": "array", "items": {"type": "string"}},
                    "default": {"enum": ["masked", "unmasked"]},
                },
            },
            "keys": {"type": "object", "additionalProperties": secret},
            "functions": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "allow": {
                        "type": "array",
                        "items": {"type": "string", "pattern": r"^[^.]+\.[^.]+$"},
                    }
                },
            },
            "channels": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "payload": {"enum": ["json", "text"]},
                        "keys": {
                            "type": "object",
                            "additionalProperties": {"$ref": "#/$defs/mask"},
                        },
                        "mask": {"$ref": "#/$defs/mask"},
                    },
                },
            },
            "tables": {
                "type": "object",
                "propertyNames": {"pattern": r"^[^.]+\.[^.]+$"},
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["columns"],
                    "properties": {
                        "subject": {"type": "string"},
                        "columns": {
                            "type": "object",
                            "additionalProperties": {"$ref": "#/$defs/mask"},
                        },
                    },
                },
            },
        },
    }
