"""What a client presents to a gateway or a sidecar: a key as ``authorization: Bearer``
metadata, and TLS on its channel (with a certificate of its own for mTLS). Used by the admin
and sidecar commands and by the event stream."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from gateway.auth.tls import channel_credentials, channel_options
from gateway.errors import SettingsError
from gateway.settings import ClientTlsSettings

__all__ = ["ADMITTED", "ClientCredentials", "bearer_metadata"]

# The header a server sends at once on a stream whose caller it admitted (the sidecar on
# Publish), so that a client writes only once it knows the stream is taken.
ADMITTED = ("sidecar-admitted", "1")


def bearer_metadata(token: str | None, where: str = "the key") -> tuple[tuple[str, str], ...]:
    """Call metadata presenting ``token`` (none without one). SettingsError naming ``where``
    when a header cannot carry it: only printable ASCII can, and no line break gets through."""
    if not token:
        return ()
    if not (token.isascii() and token.isprintable()):
        raise SettingsError(f"{where}: a header carries printable ASCII only")
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class ClientCredentials:
    """A key (``authorization: Bearer``) and TLS (``tls.ca_file`` verifies the server;
    ``tls.cert_file`` makes it mTLS). The default presents nothing, over plain TCP."""

    token: str | None = field(default=None, repr=False)
    tls: ClientTlsSettings = field(default_factory=ClientTlsSettings)

    def __post_init__(self) -> None:
        bearer_metadata(self.token)  # a key no header can carry fails here, not at a call

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token)

    def channel(self, address: str, where: str) -> grpc.Channel:
        """A channel to ``address``; its TLS files are read now (SettingsError naming
        ``where``, the server's kind: ``sidecar.ca_file: cannot read ...``)."""
        if not self.tls.enabled:
            return grpc.insecure_channel(address)
        credentials = channel_credentials(self.tls, where)
        return grpc.secure_channel(address, credentials, options=channel_options(self.tls))
