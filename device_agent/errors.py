"""The agent's exceptions: one root, one subclass per area."""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose.

    The message is one line meant for a person; ``exit_code`` is what the
    command line returns when this error ends a command.
    """

    exit_code = 1


class ConfigError(AgentError):
    """A setting is missing, of the wrong type, or out of range."""

    exit_code = 2

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"config: {field}: {problem}")
        self.field = field
        self.problem = problem


class KeyStoreError(AgentError):
    """A private key could not be made, read, or used."""

    exit_code = 3


class TPMError(KeyStoreError):
    """The TPM refused or could not be reached."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        self.detail = message
        self.rc = rc
        if rc is not None:
            message = f"{message} (TPM rc 0x{rc:03x})"
        super().__init__(message)


class CSRError(AgentError):
    """A certificate request could not be built or failed its own check."""

    exit_code = 4


class ChainError(AgentError):
    """A certificate chain was refused; ``reason`` names why, in a word."""

    exit_code = 5

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"chain refused ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class StoreError(AgentError):
    """The credential store is locked, damaged, or cannot be written."""

    exit_code = 6


class SessionError(AgentError):
    """An MQTT session could not be opened or was lost.

    ``reason`` is one of ``unreachable``, ``tls``, ``untrusted`` (we
    refused the broker's certificate), ``refused``, ``timeout``, ``lost``
    or ``topic`` (a topic MQTT does not allow); ``code`` carries the MQTT
    reason code when the broker sent one.
    """

    exit_code = 7

    def __init__(
        self, reason: str, detail: str, code: int | None = None
    ) -> None:
        prefix = "invalid topic" if reason == "topic" else f"broker {reason}"
        super().__init__(f"{prefix}: {detail}")
        self.reason = reason
        self.detail = detail
        self.code = code


class EnrollError(AgentError):
    """No certificate came back for a request.

    ``reason`` is the registrar's refusal code, or ``timeout`` or
    ``unreachable``; ``permanent`` says another try cannot help (the
    device is unknown, revoked or decommissioned); ``retry_after`` is the
    registrar's wish in seconds, if it said one.
    """

    exit_code = 8

    def __init__(
        self,
        reason: str,
        detail: str,
        retry_after: float | None = None,
        permanent: bool = False,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after = retry_after
        self.permanent = permanent


class RenewalError(AgentError):
    """A renewal transaction stopped; the active credential is unchanged."""

    exit_code = 9

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"renewal failed at {step}: {detail}")
        self.step = step
        self.detail = detail


class StoppedError(AgentError):
    """A stop was asked for while the agent waited; nothing failed.

    ``waiting_for`` names what the wait was for, such as the broker or
    the registrar's answer.
    """

    def __init__(self, waiting_for: str) -> None:
        super().__init__(f"stopped while waiting for {waiting_for}")
        self.waiting_for = waiting_for
