"""The trust boundary: who is calling (keys, mTLS subjects), TLS on ports and channels, and
the audit log of admin actions. Shared by the gateway and the evaluation sidecar."""

from gateway.auth.access import ADMIN_TOKEN, ANONYMOUS, Gatekeeper, Principal, current_principal
from gateway.auth.audit import AuditLog
from gateway.auth.bearer import ADMITTED, ClientCredentials, bearer_metadata
from gateway.auth.keys import KeyEntry, KeyRing, bearer, key_digest, peer_names
from gateway.auth.tls import channel_credentials, channel_options, server_credentials

__all__ = [
    "ADMIN_TOKEN",
    "ADMITTED",
    "ANONYMOUS",
    "AuditLog",
    "ClientCredentials",
    "Gatekeeper",
    "KeyEntry",
    "KeyRing",
    "Principal",
    "bearer",
    "bearer_metadata",
    "channel_credentials",
    "channel_options",
    "current_principal",
    "key_digest",
    "peer_names",
    "server_credentials",
]
