"""`pgveil proxy`: run the proxy, or with `--check-config` check its configuration and
rules against the upstream and exit.

Every setting of `proxy.config.SETTINGS` is a flag here (a string: `load_config` parses and
validates flags, environment and file alike). Must not hold proxy logic: it loads the
configuration and hands it to `proxy.server`.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from proxy.cli.common import Subparsers, run_event_loop
from proxy.config import SETTINGS, ConfigError, ProxyConfig, load_config
from rules.loader import RulesError, load_rules
from rules.model import Policy


def add_arguments(sub: Subparsers) -> None:
    p = sub.add_parser("proxy", help="run the proxy")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, connect to the upstream, check the rules against "
        "the databases they are for, and exit",
    )
    for s in SETTINGS:
        # every setting is a string here; config.load_config parses and validates it, so
        # the same rules apply to flags, environment and file
        p.add_argument(s.flag, dest=s.name, metavar=s.name.upper(), help=s.help, default=None)


def _flags(ns: argparse.Namespace) -> dict[str, Any]:
    return {s.name: getattr(ns, s.name) for s in SETTINGS if getattr(ns, s.name) is not None}


def main(ns: argparse.Namespace) -> int:
    from proxy import __version__
    from proxy.server import ProxyServer, serve
    from shared import logs
    from shared.implementation import implementation
    from shared.logs import log

    flags = _flags(ns)

    def load() -> ProxyConfig:
        return load_config(flags, config_file=ns.config)

    def load_policy(cfg: ProxyConfig) -> Policy | None:
        return load_rules(cfg.rules) if cfg.rules is not None else None

    config = load()
    logs.configure(config.log_format, config.log_level)
    # which data path runs (issue 15): the modules mypyc compiled, or their Python source
    log.info("proxy.implementation", implementation=implementation(), version=__version__)
    try:
        policy = load_policy(config)
    except RulesError as exc:
        raise ConfigError(str(exc)) from exc
    if policy is not None:
        log.info("rules.loaded", version=policy.version, tables=len(policy.tables))
    if ns.check_config:

        async def check() -> int:
            server = ProxyServer(config)
            ok = await server.upstream_reachable()
            state = "reachable" if ok else "UNREACHABLE"
            if not ok or policy is None:
                print(f"configuration ok; upstream {config.upstream} {state}")
                return 0 if ok else 1
            return await _check_rules(config, policy)

        return asyncio.run(check())
    run_event_loop(serve(config, load, load_policy))
    return 0


async def _check_rules(config: ProxyConfig, policy: Policy) -> int:
    """`--check-config` with rules: the rules checked against the databases they are for
    (see `proxy.catalog.check_rules`); one line per problem, exit 1 on any error."""
    from proxy.catalog import MaskingUnavailable, check_rules

    try:
        databases, found = await check_rules(config, policy)
    except MaskingUnavailable as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        text = f"{exc}{cause}".removeprefix("pgveil ").replace("\n", " ")
        raise ConfigError(text) from exc
    for database, p in found:
        where = "" if p.path.startswith("roles.") else f"database {database}: "
        print(f"{p.level}: {where}{p}")
    errors = sum(1 for _, p in found if p.level == "error")
    warnings = len(found) - errors
    if errors:
        print(
            f"rules: {errors} error(s), {warnings} warning(s); pgveil refuses what they close "
            "(see the README, 'Rules checked against the database') until they are fixed"
        )
        return 1
    checked = ", ".join(databases) if databases else "none"
    print(
        f"configuration ok; upstream {config.upstream} reachable; rules checked against "
        f"database(s) {checked}: {warnings} warning(s)"
    )
    return 0
