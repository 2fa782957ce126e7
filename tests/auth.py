"""Credentials the tests give gateways and present to them."""

from __future__ import annotations

ADMIN_TOKEN = "test-admin-token-3f9c"
# Environment for a gateway with admin rights on that token; headers for a tritonclient call.
ADMIN_ENV = {"GATEWAY_ADMIN__TOKEN": ADMIN_TOKEN}
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}
ADMIN_METADATA = [("authorization", f"Bearer {ADMIN_TOKEN}")]
