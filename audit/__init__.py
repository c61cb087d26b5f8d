"""Audit stream: event types, redaction, sinks and the bounded writer.

Arrives with issue #4. Events never carry literals from queries or values from rows.
"""

# before any module of the package: which implementation of the data path loads (issue 15)
from shared import implementation as _implementation

_implementation.install()
