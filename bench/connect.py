"""Connect benchmark: TLS 1.3 and CONNACK with a TPM key, against baselines.

Run from the repository top::

    .venv/bin/python -m bench.connect [--runs N]

In one run, against one broker, interleaved so that noise falls on every
case alike: the agent's connect with its TPM key and with a software key,
each through a fresh Session as a reconnect builds it; the TPM connect
again with its TLS context kept, so the key stays loaded; and openssl
s_client with the same TSS2 key through the same provider, the native
baseline. Then what each costs in TPM commands (from the swtpm log), and
the memory of a ``device-agent connect`` process that holds a session.
"""

from __future__ import annotations

import collections
import random
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import report
from bench.native import Handshakes, SClient, STime
from bench.tpmlog import TpmLog, summary
from bench.world import Device, World, world
from device_agent import config, credential, tls
from device_agent.config import Settings
from device_agent.session import Session

TARGET_NATIVE_RATIO = 1.2
WARMUP_ROUNDS = 1
RSS_RUNS = 3
RSS_TIMEOUT = 30.0
S_TIME_SECONDS = 1
S_TIME_RUNS = 3
# A pause between measurements, so that one case's tail (a process
# exiting, the broker closing a connection) does not fall on the next.
SETTLE = 0.02
CASES = (
    "fresh",
    "software",
    "kept",
    "handshake",
    "context",
    "software_context",
    "native",
)
LABELS = {
    "fresh": "(a) agent, TPM key, fresh Session: open() to CONNACK",
    "context": "    of which: a new TLS context for the TPM key",
    "kept": "    agent, TPM key, TLS context kept (key stays loaded)",
    "handshake": "    python ssl, that kept context: TCP + handshake only",
    "software": "(b) agent, software key, fresh Session",
    "software_context": "    of which: a new TLS context for the software key",
    "native": "(c) s_client, same TSS2 key: ClientHello to CONNACK",
    "native_handshake": "    s_client: ClientHello to handshake done",
    "native_process": "    s_client: whole process (start, load, exit)",
}


class ConnectBench:
    """The devices, contexts and clients one run measures with."""

    def __init__(self, here: World) -> None:
        self.here = here
        self.tpm_device = here.device("bench-tpm", tpm=True)
        self.soft_device = here.device("bench-sw", tpm=False)
        self.tpm = config.load(self.tpm_device.config)
        self.soft = config.load(self.soft_device.config)
        modules = self.tpm.openssl_modules or tls.default_modules_dir()
        if modules is None:
            raise RuntimeError("no tpm2 OpenSSL provider: run setup first")

        tls.load_tpm_provider(self.tpm.tcti, modules)
        self.tpm_context = _context(self.tpm, self.tpm_device)
        self.soft_context = _context(self.soft, self.soft_device)
        chain, key = self.tpm_device.current()
        self.native = SClient(
            here.port,
            here.factory_ca.root_path,
            chain,
            key,
            self.tpm.tcti,
            modules,
        )
        bundle = here.root / "factory-root-and-intermediate.pem"
        bundle.write_bytes(
            here.factory_ca.root_path.read_bytes()
            + here.factory_ca.intermediate_path.read_bytes()
        )
        self.s_time = STime(
            here.port, bundle, chain, key, self.tpm.tcti, modules
        )
        self.warm: list[Handshakes] = []
        self.warm_commands: list[list[int]] = []
        self.burst: list[Handshakes] = []
        self.order = random.Random(0)
        self.log = TpmLog(here.swtpm.log_path)
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.commands: dict[str, list[list[int]]] = collections.defaultdict(
            list
        )

    def measure(self, runs: int) -> None:
        """Each case ``runs`` times, in a new random order every round.

        s_time, which takes a second or more a run, runs a few times,
        spread over the rounds, each run next to a Python loop of
        back-to-back handshakes that lasts as long.
        """
        s_time_rounds = {
            WARMUP_ROUNDS + (runs * i) // S_TIME_RUNS
            for i in range(S_TIME_RUNS)
        }
        for round_ in range(WARMUP_ROUNDS + runs):
            cases = list(CASES)
            self.order.shuffle(cases)
            for case in cases:
                time.sleep(SETTLE)
                self.log.mark()
                took = self._run(case)
                codes = self.log.since_mark()
                if round_ < WARMUP_ROUNDS:
                    continue
                for name, seconds in took.items():
                    self.times[name].append(seconds)
                self.commands[case].append(codes)
            if round_ in s_time_rounds:
                self._run_s_time()

    def _run(self, case: str) -> dict[str, float]:
        if case == "fresh":
            session = credential.open_session(self.tpm, max_tls_version="1.3")
            return {case: _timed_open(session)}
        if case == "software":
            session = credential.open_session(self.soft, max_tls_version="1.3")
            return {case: _timed_open(session)}
        if case == "kept":
            session = _session(self.tpm, "kept", lambda: self.tpm_context)
            return {case: _timed_open(session)}
        if case == "handshake":
            return {case: _timed_handshake(self.tpm, self.tpm_context)}
        if case == "context":
            return {case: _timed_context(self.tpm, self.tpm_device)}
        if case == "software_context":
            return {case: _timed_context(self.soft, self.soft_device)}
        connect = self.native.connect()
        return {
            "native": connect.connack,
            "native_handshake": connect.handshake,
            "native_process": connect.process,
        }

    def _run_s_time(self) -> None:
        self.log.mark()
        warm = self.s_time.run(S_TIME_SECONDS)
        self.warm_commands.append(self.log.since_mark())
        self.warm.append(warm)
        self.burst.append(
            _handshake_burst(self.tpm, self.tpm_context, warm.seconds)
        )

    def close(self) -> None:
        """Free the contexts this process holds, which flushes their keys.

        Without a garbage collection: a key that a closed session still
        holds through a reference cycle shows as left loaded.
        """
        del self.tpm_context, self.soft_context

    def memory(self, runs: int) -> dict[str, list[int]]:
        """VmRSS and VmHWM in kB of processes that hold a session."""
        found: dict[str, list[int]] = collections.defaultdict(list)
        for _ in range(runs):
            for name, device, context in (
                ("tpm", self.tpm_device, self.tpm_context),
                ("software", self.soft_device, self.soft_context),
            ):
                rss, peak = self._agent_memory(device, context)
                found[f"{name}_rss"].append(rss)
                found[f"{name}_peak"].append(peak)
            rss, peak = _python_memory()
            found["python_rss"].append(rss)
            found["python_peak"].append(peak)
        return found

    def _agent_memory(
        self, device: Device, context: ssl.SSLContext
    ) -> tuple[int, int]:
        topic = f"devices/{device.id}/bench"
        process = subprocess.Popen(
            device.command(
                "connect", "--subscribe", topic,
                "--count", "1", "--timeout", str(RSS_TIMEOUT),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            _wait_for_line(process, "subscribed to")
            memory = _status_kb(process.pid)
            settings = self.tpm if device is self.tpm_device else self.soft
            _publish(settings, context, topic, b"bye")
            out, err = process.communicate(timeout=RSS_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        if process.returncode != 0 or f"{topic} bye" not in out:
            raise RuntimeError(f"device-agent connect failed: {err}")
        return memory


def _context(settings: Settings, device: Device) -> ssl.SSLContext:
    chain, key = device.current()
    assert settings.ca_file is not None
    return tls.client_context(settings.ca_file, chain, key, max_version="1.3")


def _session(
    settings: Settings, name: str, context: Callable[[], ssl.SSLContext]
) -> Session:
    # Its own client id, so that the broker does not take over a session
    # the agent holds with the same credential.
    return Session(
        settings.broker_host,
        settings.broker_port,
        f"{settings.client_id}.{name}",
        context,
        connect_timeout=settings.connect_timeout,
    )


def _timed_open(session: Session) -> float:
    began = time.perf_counter()
    session.open()
    took = time.perf_counter() - began
    try:
        if session.tls_version != "TLSv1.3":
            raise RuntimeError(f"negotiated {session.tls_version}")
    finally:
        session.close()
    return took


def _timed_context(settings: Settings, device: Device) -> float:
    """What open_session's factory does: a context for the credential."""
    chain, key = device.current()
    assert settings.ca_file is not None
    began = time.perf_counter()
    context = tls.client_context(
        settings.ca_file,
        chain,
        key,
        settings.tls_min_version,
        "1.3",
        settings.server_name,
    )
    took = time.perf_counter() - began
    del context  # frees a TPM key, which flushes it from the TPM
    return took


def _timed_handshake(settings: Settings, context: ssl.SSLContext) -> float:
    address = (settings.broker_host, settings.broker_port)
    began = time.perf_counter()
    raw = socket.create_connection(address, settings.connect_timeout)
    with context.wrap_socket(raw, server_hostname=address[0]) as link:
        took = time.perf_counter() - began
        if link.version() != "TLSv1.3":
            raise RuntimeError(f"negotiated {link.version()}")
    return took


def _handshake_burst(
    settings: Settings, context: ssl.SSLContext, seconds: float
) -> Handshakes:
    """Back-to-back handshakes for ``seconds``, as s_time makes them."""
    count = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        _timed_handshake(settings, context)
        count += 1
    return Handshakes(count, time.perf_counter() - began)


def _publish(
    settings: Settings, context: ssl.SSLContext, topic: str, payload: bytes
) -> None:
    session = _session(settings, "publisher", lambda: context)
    session.open()
    try:
        session.publish(topic, payload)
    finally:
        session.close()


def _wait_for_line(process: subprocess.Popen[str], start: str) -> None:
    assert process.stdout is not None and process.stderr is not None
    for line in process.stdout:
        if line.startswith(start):
            return
    raise RuntimeError(f"no {start!r} line: {process.stderr.read()}")


def _status_kb(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM (the peak) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    return int(fields["VmRSS"][0]), int(fields["VmHWM"][0])


def _python_memory() -> tuple[int, int]:
    """The same interpreter, started bare: the floor of any agent."""
    process = subprocess.Popen(
        [sys.executable, "-c", "print('ready', flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()
        memory = _status_kb(process.pid)
        process.communicate("\n", timeout=RSS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return memory


def build_table(
    bench: ConnectBench, memory: dict[str, list[int]], runs: int
) -> report.Table:
    table = report.Table(
        f"connect: TLS 1.3 + MQTT 5 CONNACK, mosquitto on 127.0.0.1, "
        f"swtpm; {runs} runs, interleaved",
        ["measure", "median", "p90", "TPM2_ commands each run"],
    )
    _add_times(table, bench)
    table.rule()
    _add_ratios(table, bench)
    table.rule()
    _add_commands(table, bench)
    table.rule()
    _add_memory(table, memory)
    return table


def _add_times(table: report.Table, bench: ConnectBench) -> None:
    times, commands = bench.times, bench.commands
    for name, label in LABELS.items():
        if name == "native_process":
            codes = summary(commands["native"])
        elif name.startswith("native"):
            codes = "(some of the process's, below)"
        else:
            codes = summary(commands[name])
        table.add(
            label,
            report.ms(report.median(times[name])),
            report.ms(report.p90(times[name])),
            codes,
        )
    count = sum(run.count for run in bench.warm)
    sent = sum(len(codes) for codes in bench.warm_commands)
    table.add(
        "    s_time -new, back to back: TCP + handshake, mean",
        report.ms(_each(bench.warm)),
        "",
        f"{sent / count:.2f} per handshake ({count} handshakes, "
        f"{len(bench.warm)} processes)",
    )
    table.add(
        "    python ssl, back to back as long, kept context, mean",
        report.ms(_each(bench.burst)),
        "",
        f"({sum(run.count for run in bench.burst)} handshakes)",
    )


def _each(runs: list[Handshakes]) -> float:
    """The median over runs of each run's mean handshake time."""
    return report.median([run.each for run in runs])


def _add_ratios(table: report.Table, bench: ConnectBench) -> None:
    med = {name: report.median(values) for name, values in bench.times.items()}
    table.add(
        f"ratio (a) / (c): agent / native, target <= {TARGET_NATIVE_RATIO}",
        report.ratio(med["fresh"], med["native"]),
        "",
        report.verdict(med["fresh"] / med["native"], TARGET_NATIVE_RATIO),
    )
    table.add(
        "ratio agent, context kept / (c)",
        report.ratio(med["kept"], med["native"]),
        "",
        "same TPM work as s_client; the rest is Python, paho, Session",
    )
    table.add(
        "ratio python ssl / s_time, back to back",
        report.ratio(_each(bench.burst), _each(bench.warm)),
        "",
        "both warm, key loaded, no MQTT",
    )
    table.add(
        "ratio (a) / (b): TPM key / software key",
        report.ratio(med["fresh"], med["software"]),
    )


def _add_commands(table: report.Table, bench: ConnectBench) -> None:
    table.add(
        "(d) TPM commands per handshake, key loaded",
        "",
        "",
        f"{summary(bench.commands['handshake'])}  (expected 1: Sign)",
    )
    table.add(
        "    per reconnect, fresh Session (load, handshake, free)",
        "",
        "",
        summary(bench.commands["fresh"]),
    )


def _add_memory(table: report.Table, memory: dict[str, list[int]]) -> None:
    rows = (
        ("tpm", "(e) RSS, device-agent connect --subscribe, TPM key"),
        ("software", "    same, software key"),
        ("python", "    baseline: bare python interpreter"),
    )
    for name, label in rows:
        table.add(
            label,
            _mb(memory[f"{name}_rss"]),
            "",
            f"peak (VmHWM) {_mb(memory[f'{name}_peak'])}; "
            f"median of {len(memory[f'{name}_rss'])}",
        )
    tpm = report.median(memory["tpm_rss"])
    table.add(
        "ratio RSS TPM key / software key",
        report.ratio(tpm, report.median(memory["software_rss"])),
    )
    table.add(
        "ratio RSS TPM key / bare python",
        report.ratio(tpm, report.median(memory["python_rss"])),
    )


def _mb(values: list[int]) -> str:
    return f"{report.median(values) / 1024:.1f} MB"


def main() -> int:
    options = report.arguments("bench.connect", __doc__ or "")
    report.quiet_logging()
    with world() as here:
        bench = ConnectBench(here)
        try:
            bench.measure(options.runs)
            memory = bench.memory(min(options.runs, RSS_RUNS))
        finally:
            bench.close()
        leftover = here.swtpm.transient_handles()

    table = build_table(bench, memory, options.runs)
    if leftover:
        table.rule()
        table.add("!! objects left loaded in swtpm", str(len(leftover)))
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
