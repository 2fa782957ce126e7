"""The trust boundary: who is calling (keys, mTLS subjects), TLS on ports and channels, and
the audit log of admin actions. Shared by the gateway and the evaluation sidecar."""

from gateway.auth.credentials import (
    KeyEntry,
    KeyRing,
    bearer,
    channel_credentials,
    channel_options,
    key_digest,
    peer_names,
    server_credentials,
)

__all__ = [
    "KeyEntry",
    "KeyRing",
    "bearer",
    "channel_credentials",
    "channel_options",
    "key_digest",
    "peer_names",
    "server_credentials",
]
