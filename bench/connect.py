"""Connect benchmark: TLS 1.3 and CONNACK with a TPM key, against baselines.

Run from the repository top::

    .venv/bin/python -m bench.connect [--runs N]

In one run, against one broker, interleaved so that noise falls on every
case alike. The comparison the target is set on: a new Session of the
agent in a warm process, whose TLS context (and so the key loaded in the
TPM) is kept, as a Session keeps it across reconnects, against a small C
client on the same OpenSSL with the same TSS2 key through the same
provider, also warm: both make a new TCP connection, a full TLS 1.3
handshake and an MQTT CONNECT up to CONNACK. Besides: the agent's fresh
Session that builds a new context (and loads the key again), with the
TPM key and with a software key; openssl s_client, whose handshake is
the first of a new process; s_time's warm handshakes without MQTT. Then
what each costs in TPM commands (from the swtpm log), and the memory of
a ``device-agent connect`` process that holds a session.
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
from bench.native import CClient, Handshakes, SClient, STime
from bench.stopping import stoppable
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
# The warm comparison runs first, while the C client holds its key in
# the TPM; swtpm has three object slots, and the kept context holds one,
# so the cases that load a key again (two slots for a moment) run after.
WARM_CASES = ("kept", "handshake", "c_native")
CASES = ("fresh", "software", "context", "software_context", "native")
LABELS = {
    "kept": "(a) agent, TPM key, new Session, warm: open() to CONNACK",
    "handshake": "    python ssl, that context: TCP + handshake only",
    "c_native": "(c) C + OpenSSL, same key and provider, warm: to CONNACK",
    "c_native_handshake": "    C + OpenSSL: TCP + handshake only",
    "fresh": "    agent, TPM key, fresh Session with a new TLS context",
    "context": "    of which: a new TLS context for the TPM key",
    "software": "(b) agent, software key, fresh Session",
    "software_context": "    of which: a new TLS context for the software key",
    "native": "    s_client, same TSS2 key: ClientHello to CONNACK",
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
        self.c_client = CClient(
            here.root,
            here.port,
            here.factory_ca.root_path,
            chain,
            key,
            self.tpm.tcti,
            modules,
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

        First the warm cases, with the C client; then the others.

        s_time, which takes a second or more a run, runs a few times,
        spread over the rounds, each run next to a Python loop of
        back-to-back handshakes that lasts as long.
        """
        for round_ in range(WARMUP_ROUNDS + runs):
            self._round(WARM_CASES, round_ >= WARMUP_ROUNDS)
        self.c_client.close()

        s_time_rounds = {
            WARMUP_ROUNDS + (runs * i) // S_TIME_RUNS
            for i in range(S_TIME_RUNS)
        }
        for round_ in range(WARMUP_ROUNDS + runs):
            self._round(CASES, round_ >= WARMUP_ROUNDS)
            if round_ in s_time_rounds:
                self._run_s_time()

    def _round(self, cases: tuple[str, ...], keep: bool) -> None:
        order = list(cases)
        self.order.shuffle(order)
        for case in order:
            time.sleep(SETTLE)
            self.log.mark()
            took = self._run(case)
            codes = self.log.since_mark()
            if not keep:
                continue
            for name, seconds in took.items():
                self.times[name].append(seconds)
            self.commands[case].append(codes)

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
        if case == "c_native":
            made = self.c_client.connect()
            return {case: made.connack, "c_native_handshake": made.handshake}
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
        self.c_client.close()

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
        # A terminal's Ctrl-C reaches it too; its traceback is noise.
        stderr=subprocess.DEVNULL,
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
        elif name == "c_native_handshake":
            codes = "(those of the row above)"
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
        report.ratio(med["kept"], med["c_native"]),
        "",
        report.verdict(med["kept"] / med["c_native"], TARGET_NATIVE_RATIO)
        + ": both a new TLS 1.3 session and MQTT connection, key loaded",
    )
    table.add(
        "ratio agent, fresh Session / (c)",
        report.ratio(med["fresh"], med["c_native"]),
        "",
        "the fresh Session also loads the key into the TPM again",
    )
    table.add(
        "ratio (a) / s_client",
        report.ratio(med["kept"], med["native"]),
        "",
        "s_client: first handshake of a new process",
    )
    table.add(
        "ratio python ssl / s_time, back to back",
        report.ratio(_each(bench.burst), _each(bench.warm)),
        "",
        "both warm, key loaded, no MQTT",
    )
    table.add(
        "ratio TPM key / software key, fresh Session",
        report.ratio(med["fresh"], med["software"]),
    )


def _add_commands(table: report.Table, bench: ConnectBench) -> None:
    table.add(
        "(d) TPM commands per handshake, key loaded",
        "",
        "",
        f"{summary(bench.commands['handshake'])}  (target 1: Sign; "
        "ECC_Parameters: the provider asks the TPM each time libssl reads "
        "a key parameter; Hash: it hashes for DigestSign in the TPM)",
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


def _summarize(bench: ConnectBench, memory: dict[str, list[int]]) -> None:
    med = {name: report.median(values) for name, values in bench.times.items()}
    native_ratio = med["kept"] / med["c_native"]
    report.summarize(
        "TLS 1.3 + MQTT CONNACK, TPM key, new session in a warm process",
        report.ms(med["kept"]),
        f"C + OpenSSL, same key and provider, {report.ms(med['c_native'])}",
        f"ratio {native_ratio:.2f}, target <= {TARGET_NATIVE_RATIO}: "
        + report.verdict(native_ratio, TARGET_NATIVE_RATIO),
    )
    report.summarize(
        "the same, fresh Session (new TLS context: key loaded again)",
        report.ms(med["fresh"]),
        f"software key {report.ms(med['software'])}",
        f"TPM / software {report.ratio(med['fresh'], med['software'])}",
    )
    handshake = bench.commands["handshake"]
    report.summarize(
        "TPM commands per TLS 1.3 handshake, key loaded",
        summary(handshake),
        "target 1 (Sign)",
        "ECC_Parameters and Hash come from the tpm2 provider",
    )
    report.summarize(
        "RSS, device-agent connect --subscribe, TPM key",
        _mb(memory["tpm_rss"]),
        f"bare python {_mb(memory['python_rss'])}",
    )


@stoppable
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
    _summarize(bench, memory)
    if leftover:
        table.rule()
        table.add("!! objects left loaded in swtpm", str(len(leftover)))
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
