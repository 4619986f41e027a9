"""``device-agent connect``: a one-shot mutual-TLS MQTT session."""

from __future__ import annotations

import os
import queue
import time

import click

from device_agent import credential
from device_agent.cli.edge import terminate_as_interrupt
from device_agent.cli.main import App, pass_app
from device_agent.cli.params import FiniteFloat
from device_agent.config import Settings
from device_agent.errors import ConfigError, SessionError
from device_agent.session import Message, check_topic


@click.command()
@click.option(
    "--publish",
    nargs=2,
    metavar="TOPIC MESSAGE",
    help="Publish MESSAGE to TOPIC (QoS 1).",
)
@click.option("--subscribe", "topic", metavar="TOPIC", help="Subscribe.")
@click.option(
    "--count",
    type=click.IntRange(1, 1_000_000),
    default=1,
    show_default=True,
    help="Messages to wait for with --subscribe.",
)
@click.option(
    "--timeout",
    type=FiniteFloat(0.1, 86400),
    default=30.0,
    show_default=True,
    help="Seconds to wait for messages.",
)
@click.option(
    "--tls-max-version",
    type=click.Choice(["1.2", "1.3"]),
    help="Highest TLS version to offer.",
)
@pass_app
def connect(
    app: App,
    publish: tuple[str, str] | None,
    topic: str | None,
    count: int,
    timeout: float,
    tls_max_version: str | None,
) -> None:
    """Connect to the broker with the device credential, then leave.

    The operational credential is used while it is valid, else the
    factory one.
    """
    if topic is not None:
        check_topic(topic, wildcards=True)
    if publish is not None:
        check_topic(publish[0], wildcards=False)
    terminate_as_interrupt()
    settings = app.settings()
    _check_tls_range(settings, tls_max_version)
    lineage, generation = credential.best_credential(settings)
    session = credential.open_session(
        settings, generation, lineage, max_tls_version=tls_max_version
    )
    # An id of its own, so that it does not take over the daemon's session.
    session.client_id = f"{settings.device_id}.connect.{os.getpid()}"
    started = time.monotonic()
    session.open()
    try:
        elapsed = (time.monotonic() - started) * 1000
        click.echo(
            f"connected to {session.host}:{session.port} as "
            f"{session.client_id} with the {lineage} credential "
            f"{generation.number} over {session.tls_version} "
            f"in {elapsed:.1f} ms"
        )
        if topic is not None:
            session.subscribe(topic)
            click.echo(f"subscribed to {topic}")
        if publish is not None:
            session.publish(publish[0], os.fsencode(publish[1]))
            click.echo(_published(settings, publish[0]))
        if topic is not None:
            _receive(session.messages, count, timeout)
    finally:
        session.close()


def _check_tls_range(settings: Settings, tls_max_version: str | None) -> None:
    """Refuse a TLS range with no version in it before connecting."""
    if tls_max_version is None:
        return
    if float(tls_max_version) < float(settings.tls_min_version):
        raise ConfigError(
            "tls_min_version",
            f"{settings.tls_min_version} is above --tls-max-version "
            f"{tls_max_version}: no TLS version is left to offer",
        )


def _published(settings: Settings, topic: str) -> str:
    """What a publish the broker took is called, by protocol.

    An MQTT 3.1.1 broker acknowledges a publish it refuses just like one
    it accepts, so there the acknowledgement proves only delivery.
    """
    if settings.mqtt_version == "3.1.1":
        return (
            f"sent to {topic} (MQTT 3.1.1 brokers do not report a refused "
            "publish)"
        )
    return f"published to {topic}"


def _receive(
    messages: queue.Queue[Message], count: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    for received in range(count):
        left = deadline - time.monotonic()
        try:
            message = messages.get(timeout=max(left, 0.0))
        except queue.Empty:
            raise SessionError(
                "timeout",
                f"received {received} of {count} messages in {timeout:g} s",
            ) from None
        text = message.payload.decode("utf-8", "replace")
        click.echo(f"{message.topic} {text}")


COMMANDS = [connect]
