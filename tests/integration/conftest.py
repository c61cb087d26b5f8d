"""Fixtures shared by the integration tests (the cluster and proxy are in tests/conftest.py)."""

from tests.integration.deny_fixture import deny_proxy
from tests.integration.masking_fixture import billing, text_proxy

__all__ = ["billing", "deny_proxy", "text_proxy"]
