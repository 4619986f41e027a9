"""Renewal benchmark: the transaction with a TPM key, step by step.

Run from the repository top::

    .venv/bin/python -m bench.renewal [--runs N]

A device renews its operational certificate the way the agent does it:
``device_agent.renewal.renew`` over the live session, with a registrar
that signs the CSR (in this process, on its own thread, as the tests run
it); then the switch: the old session closes, a heartbeat over the new
one proves it, and the old generation is retired. The renewal logs each
step it finishes, which a logging handler timestamps, together with the
position in the swtpm log, so that both time and TPM commands split by
step. The baseline, in the same run and interleaved round by round: the
same transaction for a device whose keys are in software.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Callable

from bench import report
from bench.tpmlog import TpmLog, summary
from bench.world import Device, World, world
from device_agent import config, credential
from device_agent.config import Settings
from device_agent.credential import OPERATIONAL
from device_agent.enroll.mqtt import MqttEnroller
from device_agent.renewal import STEPS, renew
from device_agent.session import Session
from device_agent.store import CredentialStore, Generation

WARMUP_RENEWALS = 1
AFTER = ("switch", "prove")
PARTS = (*STEPS, *AFTER)
LABELS = {
    "key": "key: new TPM key (pending generation)",
    "csr": "csr: CSR signed by the new key",
    "enroll": "enroll: CSR out, chain back over MQTT",
    "verify": "verify: chain checked to the anchor",
    "stage": "stage: chain stored, not yet current",
    "connect": "connect: second session, new credential",
    "commit": "commit: new generation made current",
    "switch": "switch: old session closed",
    "prove": "prove: heartbeat acked, old generation retired",
}
DONE = "renewal step %s done"


class StepClock(logging.Handler):
    """Notes when each renewal step ends, and where the swtpm log was."""

    def __init__(self, log: TpmLog) -> None:
        super().__init__(logging.DEBUG)
        self.log = log
        self.marks: list[tuple[str, float, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == DONE and isinstance(record.args, tuple):
            self.mark(str(record.args[0]))

    def mark(self, step: str) -> None:
        self.marks.append((step, time.perf_counter(), self.log.position()))


class Renewer:
    """One device that renews again and again over its live session."""

    def __init__(self, here: World, device: Device) -> None:
        self.device = device
        self.settings: Settings = config.load(device.config)
        lineage, generation = credential.best_credential(self.settings)
        self.session = credential.open_session(
            self.settings, generation, lineage
        )
        self.session.open()
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.commands: dict[str, list[list[int]]] = collections.defaultdict(
            list
        )

    def renew(self, clock: StepClock, record: bool) -> None:
        """One renewal and the switch, with the time and commands of each."""
        clock.marks.clear()
        clock.mark("start")
        renewed = renew(
            self.settings,
            MqttEnroller(self.session, self.settings.device_id),
            self._open_session,
        )
        old, self.session = self.session, renewed.session
        old.close()
        clock.mark("switch")

        self.session.publish(self.settings.heartbeat_topic, b'{"bench":1}')
        store = CredentialStore(self.settings.state_dir, OPERATIONAL)
        with store.lock():
            store.retire_others()
        clock.mark("prove")
        if record:
            self._record(clock)

    def close(self) -> None:
        self.session.close()

    def _open_session(self, generation: Generation) -> Session:
        return credential.open_session(self.settings, generation, OPERATIONAL)

    def _record(self, clock: StepClock) -> None:
        names = [name for name, _, _ in clock.marks]
        if names != ["start", *PARTS]:
            raise RuntimeError(f"renewal steps out of order: {names}")
        log = clock.log
        for (_, began, start), (name, ended, end) in zip(
            clock.marks, clock.marks[1:], strict=False
        ):
            self.times[name].append(ended - began)
            self.commands[name].append(log.between(start, end))

        _, first, start = clock.marks[0]
        _, committed, _ = clock.marks[len(STEPS)]
        _, last, end = clock.marks[-1]
        self.times["transaction"].append(committed - first)
        self.times["total"].append(last - first)
        self.commands["total"].append(log.between(start, end))


def measure(renewers: list[Renewer], clock: StepClock, runs: int) -> None:
    """Every device renews once a round, the order turning each round."""
    for round_ in range(WARMUP_RENEWALS + runs):
        turn = round_ % len(renewers)
        for renewer in renewers[turn:] + renewers[:turn]:
            renewer.renew(clock, record=round_ >= WARMUP_RENEWALS)


def build_table(tpm: Renewer, soft: Renewer, runs: int) -> report.Table:
    table = report.Table(
        f"renewal: TPM key vs software key, renew() in process, then the "
        f"switch; {runs} runs each, interleaved",
        [
            "step",
            "TPM median",
            "p90",
            "share",
            "software median",
            "TPM / sw",
            "TPM2_ commands (TPM key)",
        ],
    )
    total = sum(tpm.times["total"])
    for name in PARTS:
        table.add(
            LABELS[name],
            *_timing(tpm, soft, name),
            f"{sum(tpm.times[name]) / total:.0%}",
            report.ms(report.median(soft.times[name])),
            _ratio(tpm, soft, name),
            summary(tpm.commands[name]),
        )
    table.rule()
    for name, label in (
        ("transaction", "renew(): key to commit"),
        ("total", "renewal with the switch, end to end"),
    ):
        table.add(
            label,
            *_timing(tpm, soft, name),
            "",
            report.ms(report.median(soft.times[name])),
            _ratio(tpm, soft, name),
        )
    table.rule()
    table.add(
        "TPM commands for one renewal, start to retire",
        "",
        "",
        "",
        "",
        "",
        summary(tpm.commands["total"]),
    )
    return table


def _timing(tpm: Renewer, soft: Renewer, name: str) -> tuple[str, str]:
    values = tpm.times[name]
    return report.ms(report.median(values)), report.ms(report.p90(values))


def _ratio(tpm: Renewer, soft: Renewer, name: str) -> str:
    return report.ratio(
        report.median(tpm.times[name]), report.median(soft.times[name])
    )


def _with_step_clock(log: TpmLog) -> tuple[StepClock, Callable[[], None]]:
    clock = StepClock(log)
    logger = logging.getLogger("device_agent.renewal")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(clock)

    def remove() -> None:
        logger.removeHandler(clock)
        logger.setLevel(level)

    return clock, remove


def _summarize(tpm: Renewer, soft: Renewer) -> None:
    report.summarize(
        "renewal, TPM key: new key to commit",
        report.ms(report.median(tpm.times["transaction"])),
        f"software key {report.ms(report.median(soft.times['transaction']))}",
        f"TPM / software {_ratio(tpm, soft, 'transaction')}",
    )
    report.summarize(
        "renewal, TPM key, with the session switch, end to end",
        report.ms(report.median(tpm.times["total"])),
        f"software key {report.ms(report.median(soft.times['total']))}",
        f"TPM commands {summary(tpm.commands['total']).split(':')[0]}",
    )


def main() -> int:
    options = report.arguments("bench.renewal", __doc__ or "")
    report.quiet_logging()
    with world(registered=("bench-tpm", "bench-sw")) as here:
        anchors = here.client_ca_file
        tpm_device = here.device("bench-tpm", tpm=True, trust_anchor=anchors)
        soft_device = here.device("bench-sw", tpm=False, trust_anchor=anchors)
        clock, remove = _with_step_clock(TpmLog(here.swtpm.log_path))
        renewers = [Renewer(here, tpm_device), Renewer(here, soft_device)]
        try:
            # The first renewal enrolls the operational identity over the
            # factory one; the runs measured renew the operational one.
            for renewer in renewers:
                renewer.renew(clock, record=False)
            measure(renewers, clock, options.runs)
        finally:
            for renewer in renewers:
                renewer.close()
            remove()
        leftover = here.swtpm.transient_handles()

    table = build_table(renewers[0], renewers[1], options.runs)
    _summarize(renewers[0], renewers[1])
    if leftover:
        table.rule()
        table.add("!! objects left loaded in swtpm", str(len(leftover)))
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
