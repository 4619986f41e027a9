"""Fleets of simulated devices through their life; the CRL policy."""

from __future__ import annotations

import datetime
import json
import ssl

import pytest
from cryptography import x509
from sim_cli import assert_refused, invoke

from firmware_sim import evidence, fleet, report
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
    assert result.exit_code == 0, result.output
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


def test_report_names_the_key_store_of_each_device():
    outcome = fleet.Outcome(fleet.plan("clone", 3, 9))
    clone = outcome.plan.devices[-1].device_id
    original = next(
        d.device_id
        for d in outcome.plan.devices[:-1]
        if d.key_store == "software"
    )

    stores = report._key_stores(outcome)

    assert stores == (
        f"{original}, {clone} (the clone): software, NOT hardware; "
        "TPM (swtpm) for the others"
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
