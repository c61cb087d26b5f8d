"""pgveil's proxy: the PostgreSQL wire-protocol proxy and its command line.

Layers (see DESIGN.md section 3): `proxy.wire` (sans-I/O codec) <- `proxy.session`
(sans-I/O engine) <- the shell modules here (server, config, metrics, cli), which are
the only ones that touch sockets, TLS and signals.
"""

__version__ = "0.1.0"

# before any module of the package: which implementation of the data path loads (issue 15)
from shared import implementation as _implementation

_implementation.install()
