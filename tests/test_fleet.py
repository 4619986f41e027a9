"""Fleets of simulated devices through their life; the CRL policy."""

from __future__ import annotations

import datetime
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from sim_cli import alive, assert_refused, invoke, swtpm_pids

from device_agent.agent import running_pid
from firmware_sim import evidence, fleet, report
from firmware_sim.device import DeviceError, SimDevice
from firmware_sim.registry import DECOMMISSIONED, Registry
from firmware_sim.revocation import (
    CrlPublisher,
    RevocationError,
    check_crl_file,
    write_crl,
)


def test_same_seed_gives_the_same_plan_and_another_seed_another():
    first = fleet.plan("lifecycle", 50, seed=3)
    assert first == fleet.plan("lifecycle", 50, seed=3)
    assert first != fleet.plan("lifecycle", 50, seed=4)
    roles = [d.role for d in first.devices]
    assert roles.count("revoke") == roles.count("decommission") == 5
    assert roles.count("reset") == 5
    assert len({d.device_id for d in first.devices}) == 50


def test_plan_refuses_what_it_cannot_run():
    with pytest.raises(fleet.FleetError, match="scenario"):
        fleet.plan("party", 5, 1)
    with pytest.raises(fleet.FleetError, match="at least 5"):
        fleet.plan("lifecycle", 3, 1)


def test_lifecycle_of_five_tpm_devices(tmp_path):
    """Every device ends as planned; records, CRL and evidence agree."""
    outcome, run_dir = fleet.run("lifecycle", 5, 11, tmp_path, lifetime=12)

    assert outcome.checks, "no checks ran"
    failed = {k: outcome.details.get(k) for k, v in outcome.checks.items()
              if not v}  # fmt: skip
    assert not failed, failed
    assert len(outcome.reached) == 5 and all(outcome.reached.values())
    roles = {d.device_id: d.role for d in outcome.plan.devices}
    for name, answer in outcome.probes.items():
        if roles[name.split("/")[0]] == "keep":
            assert answer == "accepted"
        else:
            assert "certificate revoked" in answer, answer
    records = {f["device_id"]: f for f in outcome.factory}
    assert all(r["ek_cert_sha256"] for r in records.values())
    revoked_ids = {r["device_id"] for r in outcome.revocations}
    assert revoked_ids == {
        d for d, role in roles.items() if role in ("revoke", "decommission")
    }

    paths = report.write(outcome, tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert data["deterministic"] == json.loads(
        json.dumps(report.deterministic(outcome))
    )
    assert data["deterministic"]["plan"] == outcome.plan.as_dict()
    assert "Issuance records" in paths["markdown"].read_text()
    for key in ("renewals", "expiry", "gaps"):
        assert paths[key].read_bytes().startswith(b"\x89PNG")

    assessed = evidence.assess(run_dir)
    assert all(r.met for r in assessed), evidence.failing_devices(assessed)
    assert {r.name: r.checked for r in assessed}["revocation"] == 2

    # Decommissioning a kept device afterwards, from the top-level CLI,
    # finds its IDevID in the factory records and lists it in the CRL.
    kept = next(d for d, role in sorted(roles.items()) if role == "keep")
    world = run_dir / "world"
    crl_out = tmp_path / "crl.pem"
    result = invoke([
        "decommission", kept,
        "--registrar-dir", str(world / "registrar"),
        "--factory-dir", str(world),
        "--crl-out", str(crl_out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    idevid = int(records[kept]["idevid_serial"], 16)
    assert f"revoked serial {idevid:x}" in result.output
    with Registry(world / "registrar" / "registry.sqlite") as registry:
        assert registry.get(kept).status == DECOMMISSIONED
    assert idevid in _crl_serials(crl_out.read_bytes())

    unknown = invoke([
        "revoke", "nobody",
        "--registrar-dir", str(world / "registrar"),
        "--factory-dir", str(world),
        "--crl-out", str(crl_out),
    ])  # fmt: skip
    assert_refused(unknown, "nobody")


def test_storm_statistic_is_taken_over_the_policy_window():
    # Three devices spread over a 10 s window: one bucket, no peak.
    three = fleet.storm_spread([21.0, 24.0, 28.0], 20.0, 10.0)
    assert three["buckets"] == [3] and fleet.storm_spread_ok(three)
    # A lone request per bucket is never a peak, whatever the mean.
    lone = {"requests": 2, "peak": 1, "peak_over_mean": 2.5}
    assert fleet.storm_spread_ok(lone)
    assert not fleet.storm_spread_ok(dict(lone, peak=2))
    # 200 requests keep ten buckets; all in one of them is a storm.
    spread = [20.0 + n * 0.05 for n in range(200)]
    assert len(fleet.storm_spread(spread, 20.0, 10.0)["buckets"]) == 10
    assert fleet.storm_spread_ok(fleet.storm_spread(spread, 20.0, 10.0))
    bunched = fleet.storm_spread([20.5] * 200, 20.0, 10.0)
    assert bunched["peak_over_mean"] == 10.0
    assert not fleet.storm_spread_ok(bunched)


def test_storm_of_200_software_devices_is_spread_by_jitter(tmp_path):
    outcome, _ = fleet.run(
        "storm", 200, 5, tmp_path, software_keys=True, lifetime=30
    )

    storm = outcome.storm
    assert storm["requests"] == 200
    assert sum(storm["buckets"]) == 200
    assert storm["peak_over_mean"] <= 2.0, storm
    assert outcome.checks["records match the certificates on the devices"]
    assert outcome.checks["every device reached its state"]
    assert len(outcome.reached) == 200 and all(outcome.reached.values())
    assert len(outcome.final) == 200
    assert all(s.get("identity") == "ldevid" for s in outcome.final.values())
    data = report.deterministic(outcome)
    assert len(data["reached"]) == 200 and all(data["reached"].values())


def test_clone_is_refused_and_the_deterministic_part_repeats(tmp_path):
    first, _ = fleet.run("clone", 2, 9, tmp_path / "a", software_keys=True)
    second, _ = fleet.run("clone", 2, 9, tmp_path / "b", software_keys=True)

    assert report.deterministic(first) == report.deterministic(second)
    assert all(first.reached.values()) and len(first.reached) == 3
    assert "cloned key" in first.factory_refusals[0]["reason"]
    assert report.measured(first) != report.measured(second)


def _crl_serials(data: bytes) -> set[int]:
    end = b"-----END X509 CRL-----"
    return {
        revoked.serial_number
        for block in data.split(end)[:-1]
        for revoked in x509.load_pem_x509_crl(block.strip() + b"\n" + end)
    }


def test_expired_crl_locks_out_new_connections_until_reissued(
    registrar_world, make_identity, mqtt_probe, tmp_path
):
    """What mosquitto does with a CRL past nextUpdate, and the remedy."""
    world = registrar_world
    identity = make_identity("dev-1")
    before = mqtt_probe("before")
    assert before.connect(world.port, world.factory_ca.root_path, identity)

    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
    stale = world.factory_ca.crl(
        last_update=past, next_update=datetime.timedelta(hours=1)
    )
    write_crl(world.crl_path, stale + world.operational_ca.crl())
    world.broker.reload()

    refused = mqtt_probe("during")
    assert not refused.connect(
        world.port,
        world.factory_ca.root_path,
        identity,
        max_tls=ssl.TLSVersion.TLSv1_2,
    )
    # OpenSSL blames the certificate, and nothing in the broker's log
    # names the CRL: without monitoring this lockout is silent.
    assert refused.tls_alert == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    assert before.client.is_connected()
    assert "CRL" not in world.broker.log_text()
    with pytest.raises(RevocationError, match="expired"):
        check_crl_file(world.crl_path, 60)
    assert_refused(invoke(["crl-check", str(world.crl_path)]), "expired")

    publisher = CrlPublisher(
        world.factory_ca,
        world.operational_ca,
        world.crl_path,
        world.broker.reload,
        datetime.timedelta(seconds=2),
    )
    publisher.start()
    try:
        publisher.publish()
        after = mqtt_probe("after")
        assert after.connect(world.port, world.factory_ca.root_path, identity)
        # Re-issued at half its lifetime, it never goes stale.
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=10)
        while publisher.published < 3 and datetime.datetime.now() < deadline:
            publisher._stop.wait(0.2)
        assert publisher.published >= 3
        assert check_crl_file(world.crl_path, 0) == []
    finally:
        publisher.stop()
    result = invoke(["crl-check", str(world.crl_path), "--warn-seconds", "60"])
    # A warning has a status of its own, for monitoring to page on.
    assert result.exit_code == 3, result.output
    assert "warning: CRL of" in result.output


def test_cli_fleet_writes_the_report_where_asked(tmp_path):
    out = tmp_path / "report"
    (out / "run" / "old").mkdir(parents=True)
    result = invoke([
        "fleet", "--devices", "2", "--scenario", "clone",
        "--software-keys", "--seed", "4", "--out", str(out),
    ])  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "pass: every device reached its state" in result.output
    assert f"report: {out / 'report.md'}" in result.output
    data = json.loads((out / "report.json").read_text())
    assert data["deterministic"]["plan"]["seed"] == 4
    assert (out / "gaps.png").read_bytes().startswith(b"\x89PNG")
    assert f"replacing the previous run in {out / 'run'}" in result.output
    assert not (out / "run" / "old").exists()
    markdown = (out / "report.md").read_text()
    assert "Key store: software, NOT hardware." in markdown

    # The clone the factory refused is reported as such, not as a fleet
    # device without an identity; what the run never did is not failed.
    found = {r.name: r for r in evidence.assess(out / "run")}
    identity = found["unique identity per device"]
    assert identity.verdict == "met", identity.failures
    assert identity.checked == 2
    assert [d.endswith("-clone") for d in identity.notes] == [True]
    assert found["revocation"].checked == 0
    assert found["revocation"].verdict == "not demonstrated in this run"
    assert found["no default or shared credential"].verdict == "met"
    rotation = found["rotation"]
    assert not rotation.failures
    assert rotation.verdict in ("met", "not demonstrated in this run")
    # Software keys are not hardware-protected: that one is not met.
    assert found["private key never exported"].verdict == "NOT MET"


def _cloned_board(outcome: fleet.Outcome) -> str:
    """The board of a clone plan whose key the clone copies."""
    return next(
        d.device_id
        for d in outcome.plan.devices[:-1]
        if d.key_store == "software"
    )


def test_report_names_the_key_store_of_each_device():
    outcome = fleet.Outcome(fleet.plan("clone", 3, 9))
    clone = outcome.plan.devices[-1].device_id
    original = _cloned_board(outcome)

    stores = report._key_stores(outcome)

    assert stores == (
        f"{original}, {clone} (the clone): software, NOT hardware; "
        "TPM (swtpm) for the others"
    )


def test_report_says_the_clone_scenario_evidence_flags_its_original(
    tmp_path,
):
    """Evidence flags the board the clone copies; the report says why."""
    outcome = fleet.Outcome(fleet.plan("clone", 3, 9))
    outcome.started = outcome.finished = 1000.0
    original = _cloned_board(outcome)

    expected = report.expected_evidence(outcome)

    assert expected == (
        "Evidence to expect: 'firmware-sim evidence' on this run reports "
        f'NOT MET for "private key never exported" on {original}: the '
        "clone scenario gives the board it clones a software key, so that "
        "the key can be copied; it is not hardware-protected."
    )
    assert expected in report.write(outcome, tmp_path)["markdown"].read_text()
    tpm = fleet.Outcome(fleet.plan("storm", 3, 9))
    assert report.expected_evidence(tpm) is None
    software = fleet.Outcome(fleet.plan("storm", 3, 9, software_keys=True))
    assert "on every device: its key is in a software key store" in (
        report.expected_evidence(software) or ""
    )


def test_cli_fleet_refuses_too_small_a_lifecycle(tmp_path):
    result = invoke([
        "fleet", "--devices", "3", "--scenario", "lifecycle",
        "--out", str(tmp_path / "report"),
    ])  # fmt: skip

    assert_refused(result, "at least 5 devices")
    assert not (tmp_path / "report").exists()


def test_report_names_the_clone_counts_outages_and_clears_old_plots(
    tmp_path,
):
    outcome = fleet.Outcome(fleet.plan("clone", 3, 9))
    outcome.started = outcome.finished = 1000.0
    outcome.events = [
        (1001.0, "outage", "broker and registrar down 12.0 s"),
        (1013.0, "outage", "broker and registrar back"),
    ]
    assert report.intervention_counts(outcome) == {"outage": 1}
    (tmp_path / "storm.png").write_bytes(b"from the last run")
    paths = report.write(outcome, tmp_path)
    assert not (tmp_path / "storm.png").exists()
    title = paths["markdown"].read_text().splitlines()[0]
    assert "3 devices and a clone" in title, title


def test_storm_spread_of_too_few_devices_is_not_judged(tmp_path):
    """With two buckets or one the check passes whatever happened."""
    small = fleet.Outcome(fleet.plan("storm", 11, 1))
    small.storm = fleet.storm_spread([21.0] * 11, 20.0, 10.0)
    large = fleet.Outcome(fleet.plan("storm", 12, 1))
    large.storm = fleet.storm_spread([21.0] * 12, 20.0, 10.0)

    fleet.judge_storm(small, 11)
    fleet.judge_storm(large, 12)

    reason = (
        "11 devices are too few for the spread statistic (at least 12 needed)"
    )
    assert small.checks[fleet.STORM_CHECK] is None
    assert small.verdict(fleet.STORM_CHECK) == "not judged"
    assert small.unjudged == {fleet.STORM_CHECK: reason}
    assert small.failed == []
    assert large.verdict(fleet.STORM_CHECK) == "FAIL"
    assert large.failed == [fleet.STORM_CHECK]
    paths = report.write(small, tmp_path)
    markdown = paths["markdown"].read_text()
    assert f"| {fleet.STORM_CHECK} | not judged: {reason} |" in markdown
    assert f"The spread is not judged: {reason}." in markdown
    data = json.loads(paths["json"].read_text())["deterministic"]
    assert data["checks"][fleet.STORM_CHECK] is None
    assert data["not_judged"] == {fleet.STORM_CHECK: reason}


def test_cli_storm_of_three_devices_says_not_judged(tmp_path):
    out = tmp_path / "report"

    result = invoke([
        "fleet", "--devices", "3", "--scenario", "storm",
        "--software-keys", "--lifetime", "8", "--out", str(out),
    ])  # fmt: skip

    assert result.exit_code == 0, result.output
    assert (
        f"not judged: {fleet.STORM_CHECK}; 3 devices are too few for the "
        "spread statistic (at least 12 needed)\n"
    ) in result.output
    assert f"pass: {fleet.STORM_CHECK}" not in result.output


def test_out_dir_is_held_by_one_run_at_a_time(tmp_path):
    with fleet.OutDir(tmp_path / "out"):
        second = fleet.OutDir(tmp_path / "out")
        with pytest.raises(fleet.FleetError) as refused:
            second.__enter__()
    with fleet.OutDir(tmp_path / "out") as again:
        assert again.run_dir == tmp_path / "out" / "run"

    assert str(refused.value) == (
        f"{tmp_path / 'out'} is in use by another fleet run "
        f"(pid {os.getpid()})"
    )


def test_second_fleet_run_on_one_out_is_refused_and_sigterm_stops_all(
    tmp_path,
):
    """The second run leaves the first alone; SIGTERM leaves nothing."""
    out = tmp_path / "report"
    first = subprocess.Popen(
        [
            sys.executable, "-m", "firmware_sim", "fleet",
            "--devices", "2", "--scenario", "storm", "--lifetime", "300",
            "--out", str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        agents = _wait_for_agents(first, out / "run" / "devices", 2)
        tpms = swtpm_pids(out)
        assert len(tpms) == 2
        brokers = _children(first.pid, b"mosquitto")
        assert len(brokers) == 1

        second = invoke([
            "fleet", "--devices", "2", "--scenario", "clone",
            "--software-keys", "--out", str(out),
        ])  # fmt: skip

        assert_refused(
            second, f"{out} is in use by another fleet run (pid {first.pid})"
        )
        assert all(alive(pid) for pid in [*agents, *tpms, *brokers])
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    assert first.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.splitlines()[-1] == "error: stopped by SIGTERM"
    assert [pid for pid in [*agents, *tpms, *brokers] if alive(pid)] == []
    assert swtpm_pids(out) == []
    with fleet.OutDir(out):
        pass


class _Interrupted(BaseException):
    """Stands in for Ctrl-C in the middle of a scenario."""


def test_interrupted_fleet_stops_every_tpm_when_an_agent_stop_fails(
    tmp_path, monkeypatch
):
    stop = SimDevice.stop
    failed = []

    def stop_then_fail(device, timeout=1.0):
        stop(device, timeout)
        if not failed:
            failed.append(device.device_id)
            raise DeviceError(f"{device.device_id}: will not stop")

    def interrupt(self, issued_at):
        raise _Interrupted

    monkeypatch.setattr(SimDevice, "stop", stop_then_fail)
    monkeypatch.setattr(fleet.Fleet, "_wait_storm", interrupt)
    out = tmp_path / "report"

    with pytest.raises(_Interrupted):
        fleet.run("storm", 2, 1, out, lifetime=300)

    assert failed
    assert swtpm_pids(out) == []
    for device in (out / "run" / "devices").iterdir():
        assert running_pid(device / "state") is None


def _wait_for_agents(process, devices, count):
    """The pids of ``count`` agents running under ``devices``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the fleet ended early: {process.stderr.read()}")
        states = sorted(devices.glob("*/state")) if devices.is_dir() else []
        pids = [running_pid(state) for state in states]
        if len(pids) == count and None not in pids:
            return pids
        time.sleep(0.2)
    pytest.fail("the fleet's agents did not start in time")


def _children(parent, name):
    """Pids of live children of ``parent`` whose program is ``name``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            program = (proc / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and program.endswith(name):
            found.append(int(proc.name))
    return found


def _lifecycle_outcome():
    """A lifecycle run's outcome, as the plots need it, without a run."""
    outcome = fleet.Outcome(fleet.plan("lifecycle", 5, 3))
    outcome.started, outcome.finished = 1000.0, 1030.0
    devices = [d.device_id for d in outcome.plan.devices]
    outcome.issuances = [
        {"device_id": d, "issued_at": 1001.0 + n, "not_after": 1040.0}
        for n, d in enumerate(devices)
    ]
    outcome.events = [
        (1020.0, "revoke", devices[1]),
        (1020.0, "decommission", devices[2]),
        (1021.0, "reset", devices[3]),
    ]
    # The first device falls silent longest, so its bar is the longest.
    outcome.beats = [
        fleet.Beat(1000.0 + t, d, "ldevid", "1")
        for d, times in zip(
            devices, [(0, 28), *[range(0, 30, 1)] * 4], strict=True
        )
        for t in times
    ]
    return outcome


def test_renewals_plot_shows_interventions_of_one_moment_apart():
    figure = report.renewals_figure(_lifecycle_outcome())
    figure.canvas.draw()

    marks = {
        line.get_color(): line.get_window_extent()
        for axes in figure.axes
        for line in axes.get_lines()
        if line.get_color() in ("tab:red", "tab:purple")
    }
    assert set(marks) == {"tab:red", "tab:purple"}
    assert not marks["tab:red"].overlaps(marks["tab:purple"])
    labels = [t.get_text() for t in figure.axes[-1].get_yticklabels()]
    assert labels == ["revoke (1)", "decommission (1)", "reset (1)"]


def test_gaps_legend_covers_no_device_bar():
    outcome = _lifecycle_outcome()
    figure = report.gaps_figure(outcome)
    figure.canvas.draw()

    (axes,) = figure.axes
    legend = axes.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in axes.patches]
    assert len(bars) == 5
    assert not [bar for bar in bars if bar.overlaps(legend)]
