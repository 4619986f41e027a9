"""TLS client contexts for a credential, with TPM keys through OpenSSL."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

from device_agent.config import check_file
from device_agent.errors import ConfigError, KeyStoreError, TPMError

logger = logging.getLogger(__name__)

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

_provider_lock = threading.Lock()
_provider_tcti: str | None = None


class _NamedContext(ssl.SSLContext):
    """A client context that checks the broker against a fixed name.

    paho hands the host it connects to as the server name; a broker
    reached by address but certified under a name needs this instead.
    It is also where the TCP socket is seen before TLS wraps it.
    """

    server_name: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        if self.server_name is not None:
            kwargs["server_hostname"] = self.server_name
        # MQTT sends small packets and waits for answers; with Nagle's
        # algorithm each of them would wait ~40 ms for a delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super().wrap_socket(sock, *args, **kwargs)


def default_modules_dir() -> Path | None:
    """Where set-up put the tpm2 provider, if it is not the system's."""
    candidate = Path(sys.prefix) / "lib" / "ossl-modules"
    if (candidate / "tpm2.so").is_file():
        return candidate
    return None


def load_tpm_provider(tcti: str, modules_dir: Path | None = None) -> None:
    """Load the tpm2 OpenSSL provider into the libcrypto that ssl uses.

    The ``default`` provider is loaded first and stays the preferred one,
    so hashing and the check of the broker's chain stay in software and
    only operations on TPM keys go to the TPM. The provider reads its TCTI
    from the environment when it loads, so a process serves one TPM.
    """
    global _provider_tcti  # noqa: PLW0603 - one provider per process

    with _provider_lock:
        if _provider_tcti is not None:
            if _provider_tcti != tcti:
                raise TPMError(
                    f"this process already uses the TPM at {_provider_tcti}"
                )
            return

        import _ssl

        libssl = ctypes.CDLL(_ssl.__file__)
        load = libssl.OSSL_PROVIDER_load
        load.restype = ctypes.c_void_p
        load.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        set_path = libssl.OSSL_PROVIDER_set_default_search_path
        set_path.restype = ctypes.c_int
        set_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

        os.environ["TPM2OPENSSL_TCTI"] = tcti
        if not load(None, b"default"):
            raise TPMError("OpenSSL could not load its default provider")
        if modules_dir is not None and not modules_dir.is_dir():
            raise TPMError(
                f"openssl_modules {modules_dir}: not a directory (it should "
                "hold the tpm2 provider, tpm2.so)"
            )
        modules_dir = modules_dir or default_modules_dir()
        if modules_dir is not None:
            set_path(None, os.fsencode(modules_dir))
        if not load(None, b"tpm2"):
            # The provider opens the TPM when it loads, so an absent TPM
            # looks like a missing provider; tell the two apart.
            from device_agent import keys

            if not keys.tpm_store(tcti).answers():
                raise TPMError(f"no TPM answers at {tcti}")
            raise TPMError(
                "OpenSSL could not load the tpm2 provider "
                "(tpm2-openssl 1.2 or newer is needed; run scripts/setup.sh)"
            )
        _provider_tcti = tcti
        logger.debug("tpm2 OpenSSL provider loaded for %s", tcti)


def client_context(
    ca_file: Path,
    chain_file: Path,
    key_file: Path,
    min_version: str = "1.2",
    max_version: str | None = None,
    server_name: str | None = None,
) -> ssl.SSLContext:
    """A context that verifies the broker and presents our credential.

    The broker's certificate must chain to ``ca_file`` and carry the name
    or address we connect to (or ``server_name``); there is no option to
    turn either check off.
    """
    context = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    context.server_name = server_name
    context.minimum_version = TLS_VERSIONS[min_version]
    if max_version is not None:
        context.maximum_version = TLS_VERSIONS[max_version]

    # Checked here as well as at load: the file may have been replaced
    # since, and OpenSSL would block forever opening a FIFO.
    try:
        check_file(ca_file)
    except ValueError as exc:
        raise ConfigError("ca_file", str(exc)) from None
    try:
        context.load_verify_locations(cafile=os.fspath(ca_file))
    except FileNotFoundError:
        raise ConfigError("ca_file", f"{ca_file}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("ca_file", f"{ca_file}: {_reason(exc)}") from None

    try:
        context.load_cert_chain(os.fspath(chain_file), os.fspath(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise KeyStoreError(
            f"TLS could not use the credential {key_file.parent}: "
            f"{_reason(exc)}"
        ) from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)
