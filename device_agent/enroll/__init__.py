"""How a CSR becomes a certificate chain: the transports behind one seam.

A transport is anything with ``enroll(csr_pem, timeout) -> chain_pem``
that raises :class:`~device_agent.errors.EnrollError` when no chain comes
back. MQTT over the device's live session is the one in use; an EST
(RFC 7030) client would be another implementation of the same method.
"""

from __future__ import annotations

from typing import Protocol


class Enroller(Protocol):
    """Sends a CSR to whoever signs for this device and returns the chain."""

    def enroll(self, csr_pem: bytes, timeout: float) -> bytes:
        """The PEM chain issued for ``csr_pem``; EnrollError otherwise.

        The chain is returned as received: the caller checks it.
        """
        ...
