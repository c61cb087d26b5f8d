"""The demo's room: `pgveil demo`'s runner, the billing database it loads (schema, data
recipe and rules as package data files under `data/`), and the throwaway PostgreSQL it
starts, which the test suite and the benchmarks start the same way.

Nothing here is on the proxy's path: `proxy.server` and below never import this package.
This file imports nothing, so `proxy.demo.embedded_pg` costs only itself.
"""
