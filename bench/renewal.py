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
step. The TPM device renews as the daemon does: its TPM operations run
in a helper process, started anew for each renewal as after the weeks
between two renewals. Interleaved round by round, in the same run: the
same device with the TPM operations in this process (``renew --now``
without a running daemon), and the baseline, a device whose keys are in
software.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Callable

from bench import report
from bench.stopping import stoppable
from bench.tpmlog import TpmLog, summary
from bench.world import Device, World, world
from device_agent import config, credential, keys
from device_agent.config import Settings
from device_agent.credential import OPERATIONAL
from device_agent.enroll.mqtt import MqttEnroller
from device_agent.keys import tpmproc
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

    def __init__(
        self, here: World, device: Device, helper: bool = False
    ) -> None:
        self.device = device
        self.helper = helper
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
        keys.serve_tpm_from_child(self.helper)
        tpmproc.close_all()
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


def build_table(
    tpm: Renewer, inline: Renewer, soft: Renewer, runs: int
) -> report.Table:
    table = report.Table(
        f"renewal: TPM key (helper process, as the daemon) vs TPM key in "
        f"process vs software key, then the switch; {runs} runs each, "
        f"interleaved",
        [
            "step",
            "TPM median",
            "p90",
            "share",
            "TPM in process",
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
            report.ms(report.median(inline.times[name])),
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
            report.ms(report.median(inline.times[name])),
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


def _summarize(tpm: Renewer, inline: Renewer, soft: Renewer) -> None:
    report.summarize(
        "renewal, TPM key (helper process): new key to commit",
        report.ms(report.median(tpm.times["transaction"])),
        f"software key {report.ms(report.median(soft.times['transaction']))}",
        f"TPM / software {_ratio(tpm, soft, 'transaction')}",
    )
    report.summarize(
        "renewal, TPM key in process (renew --now): new key to commit",
        report.ms(report.median(inline.times["transaction"])),
        f"software key {report.ms(report.median(soft.times['transaction']))}",
        f"TPM / software {_ratio(inline, soft, 'transaction')}",
    )
    report.summarize(
        "renewal, TPM key, with the session switch, end to end",
        report.ms(report.median(tpm.times["total"])),
        f"software key {report.ms(report.median(soft.times['total']))}",
        f"TPM commands {summary(tpm.commands['total']).split(':')[0]}",
    )


@stoppable
def main() -> int:
    options = report.arguments("bench.renewal", __doc__ or "")
    report.quiet_logging()
    names = ("bench-tpm", "bench-tpm-inline", "bench-sw")
    with world(registered=names) as here:
        anchors = here.client_ca_file
        tpm_device = here.device(names[0], tpm=True, trust_anchor=anchors)
        inline_device = here.device(names[1], tpm=True, trust_anchor=anchors)
        soft_device = here.device(names[2], tpm=False, trust_anchor=anchors)
        clock, remove = _with_step_clock(TpmLog(here.swtpm.log_path))
        # swtpm has three object slots: two TPM devices with their live
        # sessions, plus the key a renewal makes, would not fit, so the
        # two ways with the TPM take turns, each against the software one.
        tpm = Renewer(here, tpm_device, helper=True)
        soft = Renewer(here, soft_device)
        inline: Renewer | None = None
        try:
            # The first renewal enrolls the operational identity over the
            # factory one; the runs measured renew the operational one.
            for renewer in (tpm, soft):
                renewer.renew(clock, record=False)
            measure([tpm, soft], clock, options.runs)
            tpm.close()
            inline = Renewer(here, inline_device)
            inline.renew(clock, record=False)
            measure([inline, soft], clock, options.runs)
        finally:
            for renewer in (tpm, soft, inline):
                if renewer is not None:
                    renewer.close()
            tpmproc.close_all()
            remove()
        leftover = here.swtpm.transient_handles()

    assert inline is not None
    table = build_table(tpm, inline, soft, options.runs)
    _summarize(tpm, inline, soft)
    if leftover:
        table.rule()
        table.add("!! objects left loaded in swtpm", str(len(leftover)))
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
