"""Enrollment messages between a device and the registrar, as JSON.

A device publishes a request on ``devices/<id>/enroll/request`` and the
registrar answers on ``devices/<id>/enroll/response``::

    request   {"v": 1, "id": "<request id>", "csr": "<PEM CSR>"}
    issued    {"v": 1, "id": "<request id>", "status": "issued",
               "chain": "<PEM certificates, leaf first>"}
    refused   {"v": 1, "id": "<request id>", "status": "refused",
               "reason": "<code>", "detail": "<text>",
               "retry_after": <seconds, optional>}

The broker lets a device publish only under its own id, so the topic names
the sender; the registrar checks that the CSR names the same device.

This module also runs on MicroPython: plain functions, no typing, enum or
dataclasses at run time, and only ``json`` from the standard library.
"""

import json
import math

# Annotations are for the type checker; MicroPython ignores them, and
# nothing here evaluates them at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
TOPIC_ROOT = "devices/"
MAX_MESSAGE_BYTES = 64 * 1024
MAX_ID_LENGTH = 64

ISSUED = "issued"
REFUSED = "refused"

# Why a registrar may refuse; a device treats codes it does not know as
# "internal".
REASONS = (
    "bad-request",
    "bad-signature",
    "identity-mismatch",
    "key-type",
    "unknown-device",
    "revoked",
    "decommissioned",
    "busy",
    "internal",
)

# Refusals that another attempt with the same identity cannot fix.
PERMANENT = ("unknown-device", "revoked", "decommissioned")


class MessageError(ValueError):
    """A message that is not valid JSON of the expected shape."""


def request_topic(device_id: str) -> str:
    return TOPIC_ROOT + device_id + "/enroll/request"


def response_topic(device_id: str) -> str:
    return TOPIC_ROOT + device_id + "/enroll/response"


def device_of(topic: str) -> str | None:
    """The device id in an enrollment topic, or None if it is not one."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] + "/" != TOPIC_ROOT:
        return None
    if parts[2] != "enroll" or parts[3] not in ("request", "response"):
        return None
    if not parts[1]:
        return None
    return parts[1]


def encode_request(request_id: str, csr_pem: str) -> bytes:
    _check_id(request_id)
    return _dump({"v": VERSION, "id": request_id, "csr": csr_pem})


def decode_request(data: bytes) -> tuple[str, str]:
    """The (request id, CSR PEM) of a request; MessageError if malformed."""
    message = _load(data)
    request_id = _field(message, "id")
    _check_id(request_id)
    csr = _field(message, "csr")
    return request_id, csr


def encode_issued(request_id: str, chain_pem: str) -> bytes:
    _check_id(request_id)
    return _dump(
        {"v": VERSION, "id": request_id, "status": ISSUED, "chain": chain_pem}
    )


def encode_refused(
    request_id: str,
    reason: str,
    detail: str,
    retry_after: float | None = None,
) -> bytes:
    _check_id(request_id)
    if reason not in REASONS:
        raise MessageError("unknown refusal reason " + repr(reason))
    message: dict[str, Any] = {
        "v": VERSION,
        "id": request_id,
        "status": REFUSED,
        "reason": reason,
        "detail": detail,
    }
    if retry_after is not None:
        message["retry_after"] = retry_after
    return _dump(message)


def decode_response(data: bytes) -> "dict[str, Any]":
    """A response as a dict with id, status and its fields.

    Issued: ``chain``. Refused: ``reason`` (an unknown one becomes
    "internal"), ``detail`` and ``retry_after`` (seconds or None).
    """
    message = _load(data)
    request_id = _field(message, "id")
    status = _field(message, "status")
    result: dict[str, Any] = {"id": request_id, "status": status}
    if status == ISSUED:
        result["chain"] = _field(message, "chain")
        return result
    if status != REFUSED:
        raise MessageError("unknown status " + repr(status))

    reason = _field(message, "reason")
    result["reason"] = reason if reason in REASONS else "internal"
    detail = message.get("detail", "")
    result["detail"] = detail if type(detail) is str else ""
    result["retry_after"] = _retry_after(message.get("retry_after"))
    return result


def _retry_after(value: object) -> float | None:
    # bool is a subclass of int on CPython but not on MicroPython, so the
    # type is compared exactly.
    if type(value) not in (int, float):
        return None
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number) or number < 0:
        return None
    return min(number, 7 * 86400.0)


def _check_id(request_id: object) -> None:
    if type(request_id) is not str or not request_id:
        raise MessageError("request id must be a non-empty string")
    if len(request_id) > MAX_ID_LENGTH:
        raise MessageError("request id is too long")
    for char in request_id:
        if char not in "0123456789abcdefABCDEF-":
            raise MessageError("request id must be hex digits")


def _dump(message: "dict[str, Any]") -> bytes:
    return json.dumps(message).encode()


def _load(data: bytes) -> "dict[str, Any]":
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError("message larger than 64 KiB")
    try:
        message = json.loads(data)
    except (ValueError, RuntimeError):
        # RuntimeError: deeply nested input exhausts the parser's recursion.
        raise MessageError("not JSON") from None
    if type(message) is not dict:
        raise MessageError("not a JSON object")
    if message.get("v") != VERSION:
        raise MessageError("unsupported version " + repr(message.get("v")))
    return message


def _field(message: "dict[str, Any]", name: str) -> str:
    value = message.get(name)
    if type(value) is not str or not value:
        raise MessageError("missing or empty field " + repr(name))
    return value
