"""Mutual-TLS sockets on MicroPython, with the broker always verified.

``tls.SSLContext(PROTOCOL_TLS_CLIENT)`` with CERT_REQUIRED and the server
name set is the only way in: the older ``ssl.wrap_socket`` checks no
server certificate unless told to, which would hand our certificate and
every message to whoever answers on the broker's address.

MicroPython's TLS (Mbed TLS) takes certificates and keys in DER only.
Each ``load_cert_chain`` call appends one certificate to the chain we
send, leaf first, which is how intermediates reach the broker.
"""

import socket

import tls

from device_agent.micro.errors import TransportError, os_reason


def open_tls(
    host, port, server_name, ca_ders, chain_ders, key_der, timeout=10
):
    """A connected TLS socket and a function that sets its timeout.

    ``ca_ders`` are the roots the broker's chain must build to;
    ``chain_ders`` is our chain, leaf first; ``key_der`` is the private
    key for the TLS stack. Without a ``key_der`` the stack would have to
    sign through a secure element, which stock MicroPython firmware
    cannot do.
    """
    if not server_name:
        raise TransportError("a server name is needed to verify the broker")
    if not ca_ders:
        raise TransportError("no CA certificate to verify the broker with")
    if key_der is None:
        raise TransportError(
            "this firmware's TLS stack cannot sign with a secure element"
        )

    context = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    context.verify_mode = tls.CERT_REQUIRED
    for ca in ca_ders:
        context.load_verify_locations(ca)
    for certificate in chain_ders:
        context.load_cert_chain(certificate, key_der)

    where = host + ":" + str(port)
    try:
        address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as error:
        raise TransportError(where + ": " + os_reason(error)) from None
    raw = socket.socket()
    try:
        raw.settimeout(timeout)
        raw.connect(address[0][-1])
        wrapped = context.wrap_socket(raw, server_hostname=server_name)
    except OSError as error:
        raw.close()
        raise TransportError(
            "TLS to " + where + ": " + os_reason(error)
        ) from None
    return wrapped, raw.settimeout
