"""RabbitMQ's MQTT plugin for devices: mutual TLS, CN as user, a cluster.

The same contract as the mosquitto broker in ``firmware_sim.broker``: a
device authenticates with its client certificate alone (EXTERNAL), its
certificate's common name is its user, and it reaches only the topics
under ``devices/<its name>/``. RabbitMQ 3.10 (Debian 12) speaks MQTT
3.1.1 only, so clients must use that protocol version.

Each node runs as the calling user from its own directory, with its own
Erlang cookie and an epmd of its own, and listens on loopback only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from firmware_sim.errors import BrokerError
from tpm_simulator.errors import PortInUseError
from tpm_simulator.ports import free_port, port_is_free

logger = logging.getLogger(__name__)

# The scripts themselves: /usr/sbin/rabbitmq-server and rabbitmqctl are
# wrappers that switch to user rabbitmq and its home (and its cookie).
SCRIPTS = Path("/usr/lib/rabbitmq/bin")
EPMD = "epmd"

PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_mechanism_ssl")
TLS_VERSIONS = ("tlsv1.2", "tlsv1.3")

# Erlang short node names need a host name that resolves; loopback's does
# on every machine.
NODE_HOST = "localhost"
VHOST = "/"
EXCHANGE = "amq.topic"

CONF = "rabbitmq.conf"
DEFINITIONS = "definitions.json"
PLUGINS_FILE = "enabled_plugins"
ENV_FILE = "rabbitmq-env.conf"
CA_BUNDLE = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
APPS_DIR = "apps"
LOG = "node.log"
EPMD_LOG = "epmd.log"

_READY_LINE = "Server startup complete"
_POLL_INTERVAL = 0.05
_CTL_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Node:
    """One RabbitMQ node: its Erlang name, MQTT port and directory."""

    name: str
    port: int
    dist_port: int
    directory: Path

    @property
    def full_name(self) -> str:
        return f"{self.name}@{NODE_HOST}"

    @property
    def log_path(self) -> Path:
        return self.directory / LOG

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class RabbitMQ:
    """One RabbitMQ node, or a cluster of several, on loopback.

    ``ports`` holds one MQTT-over-TLS port per node; with more than one
    the nodes form a cluster when they start, sharing users and
    permissions, so a device may connect to any of them. Devices in
    ``devices`` and the users in ``service_users`` (name to the MQTT
    topic filters it may use) exist from the start; :meth:`add_device`
    adds more while the cluster runs.
    """

    def __init__(
        self,
        workdir: Path,
        ports: Sequence[int],
        ca_file: Path,
        server_cert_file: Path,
        server_key_file: Path,
        devices: Iterable[str] = (),
        service_users: Mapping[str, Sequence[str]] | None = None,
        tls_version: str = "tlsv1.2",
        host: str = "127.0.0.1",
        epmd_port: int | None = None,
        dist_ports: Sequence[int] | None = None,
    ) -> None:
        if tls_version not in TLS_VERSIONS:
            raise BrokerError(
                f"tls_version {tls_version!r} is not one of {TLS_VERSIONS}"
            )
        if not ports:
            raise BrokerError("a RabbitMQ cluster needs at least one node")
        if dist_ports is None:
            dist_ports = [free_port(host) for _ in ports]
        if len(dist_ports) != len(ports):
            raise BrokerError("one distribution port per node is needed")

        self.workdir = Path(workdir)
        self.host = host
        self.ca_file = Path(ca_file)
        self.server_cert_file = Path(server_cert_file)
        self.server_key_file = Path(server_key_file)
        self.devices = list(devices)
        self.service_users = dict(service_users or {})
        self.tls_version = tls_version
        self.epmd_port = free_port(host) if epmd_port is None else epmd_port
        # Names carry the epmd port so that two clusters on one machine
        # never share one even if their epmds were confused.
        self.nodes = [
            Node(
                f"rmq{index}-{self.epmd_port}",
                port,
                dist_port,
                self.workdir / f"node{index}",
            )
            for index, (port, dist_port) in enumerate(
                zip(ports, dist_ports, strict=True)
            )
        ]
        self._epmd: subprocess.Popen[bytes] | None = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def port(self) -> int:
        """The MQTT port of the first node."""
        return self.nodes[0].port

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def running(self) -> bool:
        return bool(self._processes) and all(
            process.poll() is None for process in self._processes.values()
        )

    def start(self, timeout: float = 90.0) -> None:
        """Start epmd and every node; return once all serve MQTT.

        The first node boots alone; the others start once it serves, and
        join it as they boot. Nodes started side by side may each find
        no peer up yet and boot as clusters of their own, whose shared
        virtual host then refuses every client.
        """
        if self._processes:
            raise BrokerError(f"RabbitMQ on port {self.port} already runs")
        self._check_ports()

        self._install()
        try:
            self._epmd = self._spawn_epmd()
            deadline = time.monotonic() + timeout
            first, *others = self.nodes
            self._processes[first.name] = self._spawn(first)
            self._wait_ready([first], deadline)
            for node in others:
                self._processes[node.name] = self._spawn(node)
            self._wait_ready(others, deadline)
            self._check_cluster()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "RabbitMQ started: %d node(s), MQTT ports %s, dir %s",
            len(self.nodes),
            ", ".join(str(port) for port in self.ports),
            self.workdir,
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every node and its epmd, whatever state they are in.

        A node stops cleanly on SIGTERM; anything left of its process
        group after ``timeout`` is killed.
        """
        processes, self._processes = self._processes, {}
        for process in processes.values():
            _signal_group(process, signal.SIGTERM)
        for process in processes.values():
            _reap(process, timeout)

        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            _signal_group(epmd, signal.SIGTERM)
            _reap(epmd, timeout)
        if processes:
            logger.info("RabbitMQ on port %d stopped", self.port)

    def add_device(self, device_id: str) -> None:
        """Let ``device_id`` log in with its certificate, to its topics."""
        self.add_devices([device_id])

    def add_devices(self, device_ids: Iterable[str]) -> None:
        """Add several device users with one call to the cluster."""
        new = [d for d in device_ids if d not in self.devices]
        if not new:
            return

        path = self.workdir / f".add-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps(render_definitions(new, {})))
        try:
            self.ctl("import_definitions", str(path))
        finally:
            path.unlink(missing_ok=True)
        self.devices += new
        self._wait_for_users(new)
        logger.info("RabbitMQ users added: %s", ", ".join(new))

    def remove_device(self, device_id: str) -> None:
        """Delete a device's user: its certificate no longer logs in.

        RabbitMQ also closes the sessions the user has open, on every
        node, so this locks a device out at once.
        """
        self.ctl("delete_user", device_id)
        if device_id in self.devices:
            self.devices.remove(device_id)
        logger.info("RabbitMQ user removed: %s", device_id)

    def users(self) -> list[str]:
        """The users the cluster knows, as rabbitmqctl lists them."""
        out = self.ctl("list_users", "--quiet", "--no-table-headers")
        return [line.split("\t")[0] for line in out.splitlines() if line]

    def cluster_nodes(self) -> list[str]:
        """The nodes the first node sees running in its cluster."""
        out = self.ctl("cluster_status", "--formatter", "json")
        try:
            running = json.loads(out)["running_nodes"]
        except (ValueError, KeyError, TypeError):
            raise BrokerError(
                "rabbitmqctl cluster_status: no node list"
            ) from None
        return [str(name) for name in running]

    def ctl(
        self, *args: str, node: int = 0, timeout: float = _CTL_TIMEOUT
    ) -> str:
        """Run rabbitmqctl against one node and return what it printed."""
        command = [
            str(SCRIPTS / "rabbitmqctl"),
            "-n",
            self.nodes[node].full_name,
            *args,
        ]
        try:
            result = subprocess.run(
                command,
                env=self._env(self.nodes[node]),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BrokerError(
                f"rabbitmqctl {args[0]} did not finish in time"
            ) from None
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines()
            raise BrokerError(
                f"rabbitmqctl {args[0]}: {why[-1] if why else 'failed'}"
            )
        return result.stdout

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def config_text(self, node: Node) -> str:
        """The rabbitmq.conf ``node`` runs with."""
        return render_config(
            port=node.port,
            host=self.host,
            ca_file=self.workdir / CA_BUNDLE,
            cert_file=self.workdir / SERVER_CERT,
            key_file=self.workdir / SERVER_KEY,
            tls_version=self.tls_version,
            definitions_file=self.workdir / DEFINITIONS,
            cluster=[n.full_name for n in self.nodes],
        )

    def definitions(self) -> dict[str, object]:
        """Users and permissions every node loads when it boots."""
        return render_definitions(self.devices, self.service_users)

    def _check_ports(self) -> None:
        ports = [self.epmd_port]
        for node in self.nodes:
            ports += [node.port, node.dist_port]
        for port in ports:
            if not port_is_free(port, self.host):
                raise PortInUseError(port, "rabbitmq")

    def _install(self) -> None:
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _copy(self.ca_file, self.workdir / CA_BUNDLE, 0o644)
        _copy(self.server_cert_file, self.workdir / SERVER_CERT, 0o644)
        _copy(self.server_key_file, self.workdir / SERVER_KEY, 0o600)
        (self.workdir / DEFINITIONS).write_text(
            json.dumps(self.definitions(), indent=1)
        )
        (self.workdir / PLUGINS_FILE).write_text(f"[{','.join(PLUGINS)}].\n")
        _link_applications(self.workdir / APPS_DIR)
        # An empty environment file, so that /etc/rabbitmq's is not read.
        (self.workdir / ENV_FILE).write_text("")

        home = self.workdir / "home"
        home.mkdir(mode=0o700, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
            cookie.chmod(0o400)

        for node in self.nodes:
            shutil.rmtree(node.directory, ignore_errors=True)
            node.directory.mkdir(mode=0o700)
            (node.directory / CONF).write_text(self.config_text(node))

    def _env(self, node: Node) -> dict[str, str]:
        # Distribution (node to node and rabbitmqctl to node) binds to
        # loopback and finds nodes through our own epmd, never the
        # machine's on 4369.
        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            HOME=str(self.workdir / "home"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / ENV_FILE),
            RABBITMQ_NODENAME=node.full_name,
            RABBITMQ_CONFIG_FILE=str(node.directory / CONF),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / PLUGINS_FILE),
            RABBITMQ_MNESIA_BASE=str(node.directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.directory / "log"),
            RABBITMQ_PLUGINS_DIR=str(self.workdir / APPS_DIR),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(node.directory / "plugins"),
            RABBITMQ_PID_FILE=str(node.directory / "node.pid"),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                f"-start_epmd false {loopback}"
            ),
            RABBITMQ_CTL_ERL_ARGS=loopback,
        )
        return env

    def _spawn_epmd(self) -> subprocess.Popen[bytes]:
        with (self.workdir / EPMD_LOG).open("wb") as log:
            return subprocess.Popen(
                [EPMD, "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def _spawn(self, node: Node) -> subprocess.Popen[bytes]:
        # Its own session keeps a terminal's Ctrl-C away from the node and
        # lets stop() reach the helpers Erlang starts beside it.
        with node.log_path.open("wb") as log:
            return subprocess.Popen(
                [str(SCRIPTS / "rabbitmq-server")],
                env=self._env(node),
                cwd=node.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def _wait_ready(self, nodes: Sequence[Node], deadline: float) -> None:
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                process = self._processes[node.name]
                if process.poll() is not None:
                    raise self._start_failure(
                        node, f"exited with {process.returncode}"
                    )
                # The node logs that it is up once its listeners are
                # open; the port check makes sure the listener is ours.
                if _READY_LINE in node.log_text() and not port_is_free(
                    node.port, self.host
                ):
                    waiting.remove(node)
            if waiting and time.monotonic() > deadline:
                raise self._start_failure(waiting[0], "not ready in time")
            time.sleep(_POLL_INTERVAL)

    def _check_cluster(self) -> None:
        expected = {node.full_name for node in self.nodes}
        running = set(self.cluster_nodes())
        if not expected <= running:
            missing = ", ".join(sorted(expected - running))
            raise BrokerError(f"RabbitMQ nodes {missing} did not join")

    def _wait_for_users(self, names: Sequence[str]) -> None:
        # rabbitmqctl import_definitions returns before the import is
        # done. It imports users, then permissions, then topic
        # permissions: a user is usable once its topic permissions show.
        deadline = time.monotonic() + _CTL_TIMEOUT
        while not set(names) <= set(self._users_with_topics()):
            if time.monotonic() > deadline:
                raise BrokerError(f"users {', '.join(names)} never appeared")
            time.sleep(_POLL_INTERVAL)

    def _users_with_topics(self) -> list[str]:
        out = self.ctl(
            "list_topic_permissions", "--quiet", "--no-table-headers"
        )
        return [line.split("\t")[0] for line in out.splitlines() if line]

    def _start_failure(self, node: Node, what: str) -> BrokerError:
        lines = node.log_text().strip().splitlines()
        errors = [line for line in lines if "[error]" in line] or lines
        tail = " | ".join(line.strip() for line in errors[-3:])
        return BrokerError(f"RabbitMQ node {node.name} {what}: {tail}")


def render_config(
    *,
    port: int,
    host: str,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    definitions_file: Path,
    tls_version: str = "tlsv1.2",
    cluster: Sequence[str] = (),
) -> str:
    """A rabbitmq.conf for devices: MQTT over mutual TLS, CN as user.

    Only one listener opens, MQTT over TLS on ``host`` and ``port``; it
    requires a client certificate that chains to ``ca_file`` and logs
    the client in as the certificate's common name, with no password.
    AMQP, plain MQTT and the management interface stay closed. Users
    and permissions come from ``definitions_file`` at boot, which also
    keeps RabbitMQ from creating its default user guest.
    """
    versions = TLS_VERSIONS[TLS_VERSIONS.index(tls_version) :]
    lines = [
        "listeners.tcp = none",
        "mqtt.listeners.tcp = none",
        f"mqtt.listeners.ssl.default = {host}:{port}",
        f"ssl_options.cacertfile = {ca_file}",
        f"ssl_options.certfile = {cert_file}",
        f"ssl_options.keyfile = {key_file}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
    ]
    lines += [
        f"ssl_options.versions.{n} = {v}"
        for n, v in enumerate(reversed(versions), 1)
    ]
    lines += [
        "mqtt.ssl_cert_login = true",
        "ssl_cert_login_from = common_name",
        "mqtt.allow_anonymous = false",
        f"mqtt.vhost = {VHOST}",
        f"mqtt.exchange = {EXCHANGE}",
        "mqtt.tcp_listen_options.nodelay = true",
        f"load_definitions = {definitions_file}",
        "log.console = true",
        "log.console.level = info",
        "log.file = false",
    ]
    if len(cluster) > 1:
        lines.append(
            "cluster_formation.peer_discovery_backend = classic_config"
        )
        # Nodes that boot together each try to join the others before one
        # of them goes ahead alone and the others join it; by default they
        # keep trying for five seconds.
        lines += [
            "cluster_formation.discovery_retry_limit = 2",
            "cluster_formation.discovery_retry_interval = 250",
        ]
        lines += [
            f"cluster_formation.classic_config.nodes.{n} = {name}"
            for n, name in enumerate(cluster, 1)
        ]
    return "\n".join(lines) + "\n"


def render_definitions(
    devices: Iterable[str], service_users: Mapping[str, Sequence[str]]
) -> dict[str, object]:
    """RabbitMQ definitions: users without passwords and what they reach.

    A device may publish and subscribe only under ``devices/<id>/``
    (topic permissions), and may only create and read subscription
    queues of its own MQTT client ids, which are ``<id>.<word>.<word>``.
    A service user may use the MQTT topic filters it is given.
    """
    users = []
    permissions = []
    topic_permissions = []
    for device_id in devices:
        topic = "^devices\\." + _escape(_routing(device_id)) + "(\\.|$)"
        queues = (
            "mqtt-subscription-" + _escape(device_id) + r"\.[^.]+\.[^.]+"
            "qos[01]"
        )
        users.append(_user(device_id, "device"))
        permissions.append(_permission(device_id, queues))
        topic_permissions.append(_topic_permission(device_id, topic))

    for name, filters in service_users.items():
        topic = "|".join(filter_pattern(f) for f in filters) or "^$"
        queues = "mqtt-subscription-" + _escape(name) + ".*"
        users.append(_user(name, "service"))
        permissions.append(_permission(name, queues))
        topic_permissions.append(_topic_permission(name, topic))

    return {
        "vhosts": [{"name": VHOST}],
        "users": users,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
    }


def filter_pattern(topic_filter: str) -> str:
    """The regex that lets a user use an MQTT topic filter in RabbitMQ.

    RabbitMQ checks topic permissions against AMQP routing keys, where
    MQTT's ``/`` is ``.`` and ``+`` is ``*``; the pattern matches the
    filter itself (to subscribe) and every topic it covers (to publish).
    """
    parts = []
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if level == "#":
            parts.append("(\\..*)?" if index else ".*")
            break
        part = "[^.]+" if level == "+" else _escape(_routing(level))
        parts.append(part if not index else "\\." + part)
    return "^" + "".join(parts) + "$"


def _user(name: str, role: str) -> dict[str, object]:
    # An empty password hash matches no password: the user can only log
    # in through its certificate.
    return {
        "name": name,
        "password_hash": "",
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": [],
        "limits": {},
        "metadata": {"description": f"device-agent {role}"},
    }


def _permission(user: str, queues: str) -> dict[str, str]:
    exchange = _escape(EXCHANGE)
    return {
        "user": user,
        "vhost": VHOST,
        "configure": f"^{queues}$",
        "write": f"^({exchange}|{queues})$",
        "read": f"^({exchange}|{queues})$",
    }


def _topic_permission(user: str, pattern: str) -> dict[str, str]:
    return {
        "user": user,
        "vhost": VHOST,
        "exchange": EXCHANGE,
        "write": pattern,
        "read": pattern,
    }


def _routing(level: str) -> str:
    # The MQTT plugin swaps "." and "/" between topics and routing keys.
    return level.replace(".", "/")


def _escape(text: str) -> str:
    return re.sub(r"([^A-Za-z0-9_-])", r"\\\1", text)


def _link_applications(target: Path) -> None:
    """Link the applications the nodes need, and only those, into target.

    RabbitMQ loads every application in its plugins directory while it
    boots, enabled or not; left with only what rabbit and our plugins
    depend on, a node boots seconds sooner.
    """
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(mode=0o755)
    available = _applications(
        (SCRIPTS / "rabbitmq-server").resolve().parent.parent / "plugins"
    )

    wanted = ["rabbit", "rabbitmq_prelaunch", *PLUGINS]
    linked: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in linked or name not in available:
            continue
        directory, dependencies = available[name]
        (target / directory.name).symlink_to(directory)
        linked.add(name)
        wanted += dependencies


def _applications(plugins: Path) -> dict[str, tuple[Path, list[str]]]:
    """Each application under ``plugins``: its directory and dependencies.

    Applications of Erlang/OTP itself (kernel, ssl, ...) live elsewhere
    and are not listed.
    """
    found: dict[str, tuple[Path, list[str]]] = {}
    for app_file in plugins.glob("*/ebin/*.app"):
        text = app_file.read_text(errors="replace")
        names: list[str] = []
        for key in ("applications", "included_applications"):
            match = re.search(r"\{" + key + r",\s*\[([^\]]*)\]", text)
            if match:
                names += re.findall(r"[a-z][a-z0-9_]*", match.group(1))
        found[app_file.stem] = (app_file.parent.parent, names)
    if "rabbit" not in found:
        raise BrokerError(f"no RabbitMQ applications in {plugins}")
    return found


def _copy(source: Path, target: Path, mode: int) -> None:
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        raise BrokerError(f"{source}: {exc.strerror}") from None
    os.chmod(target, mode)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _reap(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``process`` to exit, then kill what is left of its group.

    The exited process is left unreaped until its group is killed, so
    the group id cannot have passed to a new process in between.
    """
    deadline = time.monotonic() + timeout
    while not _exited(process.pid):
        if time.monotonic() > deadline:
            logger.warning("pid %d ignored SIGTERM, killing it", process.pid)
            break
        time.sleep(_POLL_INTERVAL)
    # Erlang's port helpers share the group and may outlive the VM.
    _signal_group(process, signal.SIGKILL)
    process.wait(timeout)


def _exited(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None
