"""`python -m proxy.cli`: the same as the `pgveil` command (tests and bench run it so)."""

import sys

from proxy.cli import main

sys.exit(main())
