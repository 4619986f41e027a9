"""TPM fault campaign: the TPM goes away, comes back, locks out, fills up.

Run from the repository top::

    .venv/bin/python -m campaigns.tpm_faults [--handshakes 1000]
                                             [--renewals 100]

One device keeps its keys in a swtpm without a resource manager (three
transient object slots shared by every client). Against it:

- swtpm absent when the agent starts: ``connect`` fails with one line
  naming the TPM, the daemon shows one state and retries without
  spinning, and connects once swtpm is back;
- swtpm restarted under the running daemon: it renews and stays
  connected (restarting itself once if the OpenSSL provider lost the
  TPM, as systemd's Restart=on-failure would);
- the TPM in dictionary-attack lockout: another client's bad
  passwords lock the TPM; the agent's keys are made without DA
  protection, so it connects and renews throughout;
- out of object memory: another client holds every slot; the agent
  answers with one clear line and one state, and recovers once they
  are free;
- handle leaks: the handshakes and renewals asked for, then the
  transient handles left in swtpm, which must be none.

The exit status is non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.stopping import stoppable
from bench.world import Device, World, world
from campaigns import common
from device_agent.agent import RestartError
from firmware_sim.process import stop_process

DEVICE = "faults-tpm"
DEFAULT_HANDSHAKES = 1000
DEFAULT_RENEWALS = 100
# A daemon that retries at most every retry_cap seconds makes about
# window / retry_cap attempts; more than twice that is a spin.
RETRY_CAP = 2.0
WATCH_WINDOW = 6.0
STATE_TIMEOUT = 40.0
FAST = {
    "heartbeat_interval": 1.0,
    "retry_base": 0.5,
    "retry_cap": RETRY_CAP,
    "enroll_timeout": 5.0,
    "connect_timeout": 5.0,
}

# TPM numbers from the TPM 2.0 spec.
RC_LOCKOUT = 0x921
RC_OBJECT_MEMORY = 0x902
# TPM_PT_LOCKOUT_COUNTER, followed by TPM_PT_MAX_AUTH_FAIL.
PT_LOCKOUT = 0x20E

# The handshake and renewal loops run in a process of their own, which
# loads the tpm2 OpenSSL provider for this device's TPM.
_WORKER = """
import sys
from pathlib import Path
from device_agent import config, credential
settings = config.load(Path(sys.argv[1]))
handshakes, renewals = int(sys.argv[2]), int(sys.argv[3])
for _ in range(handshakes):
    session = credential.open_session(settings)
    session.open()
    session.close()
for _ in range(renewals):
    credential.renew_once(settings)
print(handshakes, renewals, flush=True)
"""


class CheckError(Exception):
    """A scenario's check failed; the message says which."""


@dataclasses.dataclass
class Outcome:
    """What one scenario showed."""

    name: str
    ok: bool
    detail: str


class Daemon:
    """``device-agent run``, restarted when it asks for a restart.

    The agent exits with RestartError's code when its TPM provider is
    beyond repair inside the process; systemd starts it again, and so
    does this class.
    """

    def __init__(self, device: Device, log: Path) -> None:
        self.device = device
        self.log_path = log
        self.restarts = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.device.command("-v", "run"),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def supervise(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            return
        if code != RestartError.exit_code:
            raise CheckError(f"the agent exited with {code}: {self.tail()}")
        self.restarts += 1
        self.start()

    def status(self) -> dict[str, Any]:
        self.supervise()
        try:
            text = (self.device.state / "status.json").read_text()
            found = json.loads(text)
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def wait(
        self, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + STATE_TIMEOUT
        while time.monotonic() < deadline:
            found = self.status()
            if check(found):
                return found
            time.sleep(0.2)
        raise CheckError(f"no {what} in {STATE_TIMEOUT:g} s: {found}")

    def connected(self) -> dict[str, Any]:
        return self.wait(
            lambda s: (
                s.get("state") == "connected" and s.get("identity") == "ldevid"
            ),
            "operational connection",
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=20)

    def tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return " | ".join(lines[-3:])

    def errors_logged(self) -> int:
        text = self.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if line.startswith("ERROR"))


def one_line_failure(device: Device, *args: str) -> str:
    """Run a command that must fail with one clear line; return it."""
    started = time.monotonic()
    result = subprocess.run(
        device.command(*args),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    if result.returncode == 0:
        raise CheckError(f"{' '.join(args)} succeeded")
    if len(lines) != 1 or "Traceback" in result.stderr:
        raise CheckError(f"{' '.join(args)} said {result.stderr!r}")
    return f"{lines[0]} ({time.monotonic() - started:.1f} s)"


def renew_through(daemon: Daemon) -> str:
    """Ask the running agent to renew; return what it answered."""
    answer = daemon.device.run("renew", "--now").strip().splitlines()[-1]
    if "renewed" not in answer:
        raise CheckError(f"renew --now: {answer}")
    return answer


def absent_at_start(here: World, daemon: Daemon) -> Outcome:
    here.swtpm.stop()
    try:
        line = one_line_failure(daemon.device, "connect")
        if "TPM" not in line:
            raise CheckError(f"connect without a TPM: {line}")
        daemon.start()
        time.sleep(WATCH_WINDOW)
        seen = daemon.status()
        attempts = daemon.errors_logged() + daemon.log_path.read_text(
            errors="replace"
        ).count("WARNING")
        if "TPM" not in str(seen.get("last_result")):
            raise CheckError(f"status does not name the TPM: {seen}")
        limit = 2 * (WATCH_WINDOW / RETRY_CAP + 2) * 2
        if attempts > limit:
            raise CheckError(f"{attempts} attempts in {WATCH_WINDOW:g} s")
    finally:
        if not here.swtpm.running:
            here.swtpm.start()
    daemon.connected()
    return Outcome(
        "swtpm absent at start",
        True,
        f"CLI: {line}; daemon: state {seen.get('state')!r}, "
        f"{attempts} log lines in {WATCH_WINDOW:g} s, connected once back",
    )


def restart_under_agent(here: World, daemon: Daemon) -> Outcome:
    daemon.connected()
    before = daemon.restarts
    here.swtpm.stop()
    here.swtpm.start()
    # The broker drops the session, so the reconnect must sign anew.
    here.broker.stop()
    here.broker.start()
    daemon.connected()
    answer = renew_through(daemon)
    daemon.connected()
    return Outcome(
        "swtpm restarted under the agent",
        True,
        f"reconnected and {answer.removeprefix('agent: ')[:40]}; "
        f"{daemon.restarts - before} process restarts",
    )


def lockout(here: World, daemon: Daemon) -> Outcome:
    daemon.connected()
    with _esapi(here) as ectx:
        failures = _lock_out(ectx)
        try:
            if not _in_lockout(ectx):
                raise CheckError("the TPM did not lock out")
            answer = renew_through(daemon)
            daemon.device.run("connect")
            still = _in_lockout(ectx)
        finally:
            _reset_lockout(ectx)
    if not still:
        raise CheckError("the lockout ended before the checks")
    daemon.connected()
    return Outcome(
        "dictionary-attack lockout",
        True,
        f"locked out after {failures} bad passwords; the agent's keys "
        f"have noDA: {answer.removeprefix('agent: ')[:40]}, connect ok",
    )


def object_memory(here: World, daemon: Daemon) -> Outcome:
    daemon.connected()
    with _esapi(here) as ectx:
        held = _fill_slots(ectx)
        try:
            line = one_line_failure(daemon.device, "connect")
            if f"0x{RC_OBJECT_MEMORY:03x}" not in line:
                raise CheckError(f"connect with the TPM full: {line}")
            result = subprocess.run(
                daemon.device.command("renew", "--now"),
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            refused = result.returncode != 0 and "Traceback" not in (
                result.stderr
            )
            if not refused:
                raise CheckError(f"renew with the TPM full: {result}")
            seen = daemon.status()
        finally:
            for handle in held:
                ectx.flush_context(handle)
    answer = renew_through(daemon)
    daemon.connected()
    return Outcome(
        "out of object memory",
        True,
        f"{len(held)} slots held: CLI {line}; daemon state "
        f"{seen.get('state')!r}, last result {seen.get('last_result')!r}; "
        f"once freed: {answer.removeprefix('agent: ')[:40]}",
    )


def handle_leaks(
    here: World, device: Device, handshakes: int, renewals: int
) -> tuple[Outcome, int, int]:
    before = here.swtpm.transient_handles()
    subprocess.run(
        [
            sys.executable, "-c", _WORKER, str(device.config),
            str(handshakes), str(renewals),
        ],
        check=True, capture_output=True, timeout=3600,
    )  # fmt: skip
    after = here.swtpm.transient_handles()
    ok = len(after) == 0
    return (
        Outcome(
            f"{handshakes} handshakes, {renewals} renewals",
            ok,
            f"transient handles before {len(before)}, after {len(after)}",
        ),
        len(before),
        len(after),
    )


@contextlib.contextmanager
def _esapi(here: World) -> Iterator[Any]:
    from tpm2_pytss import ESAPI

    with ESAPI(here.swtpm.tcti) as ectx:
        yield ectx


def _lock_out(ectx: Any) -> int:
    """Two tries allowed, then bad passwords until the TPM locks out."""
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.constants import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_RH,
        TPM2_ST,
        TPMA_OBJECT,
    )
    from tpm2_pytss.types import (
        TPM2B_DIGEST,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMS_SENSITIVE_CREATE,
        TPMT_SIG_SCHEME,
        TPMT_TK_HASHCHECK,
    )

    ectx.dictionary_attack_parameters(2, 60, 0, session1=ESYS_TR.PASSWORD)
    template = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256",
        objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN,
    )
    primary, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc256")
    secret = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=b"right"))
    private, public, *_ = ectx.create(primary, secret, template)
    victim = ectx.load(primary, private, public)
    ectx.flush_context(primary)
    ectx.tr_set_auth(victim, b"wrong")
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
    try:
        for tries in range(1, 10):
            try:
                ectx.sign(victim, TPM2B_DIGEST(bytes(32)), scheme, ticket)
            except TSS2_Exception as exc:
                if exc.rc == RC_LOCKOUT:
                    return tries
    finally:
        ectx.flush_context(victim)
    raise CheckError("nine bad passwords did not lock the TPM out")


def _in_lockout(ectx: Any) -> bool:
    """Whether the failed tries have reached the TPM's maximum."""
    from tpm2_pytss.constants import TPM2_CAP

    _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, PT_LOCKOUT, 2)
    props = {
        int(p.property): int(p.value)
        for p in data.data.tpmProperties.tpmProperty
    }
    return props[PT_LOCKOUT] >= props[PT_LOCKOUT + 1] > 0


def _reset_lockout(ectx: Any) -> None:
    from tpm2_pytss.constants import ESYS_TR

    ectx.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)


def _fill_slots(ectx: Any) -> list[Any]:
    """Primary keys until the TPM has no object slot left; kept loaded."""
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    held = []
    while len(held) < 10:
        try:
            handle, *_ = ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), "ecc256"
            )
        except TSS2_Exception as exc:
            if exc.rc != RC_OBJECT_MEMORY:
                raise
            return held
        held.append(handle)
    raise CheckError("the TPM took ten objects: not a 3-slot swtpm")


def run_scenario(
    step: Callable[[], Outcome], name: str, outcomes: list[Outcome]
) -> None:
    try:
        outcomes.append(step())
    except (CheckError, RuntimeError, OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()
        outcomes.append(Outcome(name, False, detail[0] if detail else ""))


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common.argument_parser("tpm_faults", __doc__)
    parser.add_argument("--handshakes", type=int, default=DEFAULT_HANDSHAKES)
    parser.add_argument("--renewals", type=int, default=DEFAULT_RENEWALS)
    options = parser.parse_args(argv)
    if options.handshakes < 0 or options.renewals < 0:
        parser.error("--handshakes and --renewals must not be negative")
    return options


@stoppable
def main(argv: Sequence[str] | None = None) -> int:
    options = arguments(argv)
    report.quiet_logging()
    # The TSS libraries print every TPM error they see; the ones this
    # campaign provokes are expected.
    os.environ["TSS2_LOG"] = "all+NONE"
    started = time.monotonic()
    outcomes: list[Outcome] = []

    with world(registered=[DEVICE]) as here:
        device = here.device(
            DEVICE, tpm=True, trust_anchor=here.client_ca_file
        )
        device.configure(**FAST)
        device.run("renew", "--now")
        daemon = Daemon(device, here.root / "daemon.log")
        try:
            for name, step in (
                ("swtpm absent at start", absent_at_start),
                ("swtpm restarted under the agent", restart_under_agent),
                ("dictionary-attack lockout", lockout),
                ("out of object memory", object_memory),
            ):
                run_scenario(lambda s=step: s(here, daemon), name, outcomes)
        finally:
            daemon.stop()
        here.swtpm.flush()
        leak, _before, _after = handle_leaks(
            here, device, options.handshakes, options.renewals
        )
        outcomes.append(leak)
        restarts = daemon.restarts

    table = report.Table(
        f"TPM fault campaign: {len(outcomes)} scenarios",
        ["scenario", "result", "what was seen"],
    )
    for outcome in outcomes:
        table.add(
            outcome.name, "ok" if outcome.ok else "FAILED", outcome.detail
        )
    table.rule()
    failed = sum(not o.ok for o in outcomes)
    table.add("failed", str(failed), "")
    table.add("agent restarts asked for", str(restarts), "")
    table.add("time", f"{time.monotonic() - started:.1f} s", "")
    table.print()
    return 1 if failed else 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
