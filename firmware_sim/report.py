"""The fleet report: JSON for machines, Markdown and plots for people.

``report.json`` has two parts. ``deterministic`` holds what the seed
decides and the verdicts (the plan, whether each device reached its
state, which checks passed): the same seed gives the same part.
``measured`` holds what the clock decides: times, serials, gaps.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

# Before pyplot is imported: no display is needed or wanted.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from firmware_sim.fleet import STORM_CHECK, Outcome

logger = logging.getLogger(__name__)

JSON_FILE = "report.json"
MARKDOWN_FILE = "report.md"


def deterministic(outcome: Outcome) -> dict[str, Any]:
    """The part of the report the seed alone decides."""
    return {
        "plan": outcome.plan.as_dict(),
        "reached": dict(sorted(outcome.reached.items())),
        "checks": dict(sorted(outcome.checks.items())),
        "not_judged": dict(sorted(outcome.unjudged.items())),
    }


def measured(outcome: Outcome) -> dict[str, Any]:
    """The part the clock decides: times, serials, gaps."""
    return {
        "wall_s": round(outcome.finished - outcome.started, 2),
        "phases_s": {k: round(v, 2) for k, v in outcome.phases.items()},
        "peak_rss_mb": round(outcome.memory_mb, 1),
        "check_details": outcome.details,
        "storm": outcome.storm,
        "gaps_s": {k: round(v, 3) for k, v in gaps(outcome).items()},
        "renewals": renewal_counts(outcome),
        "final_status": outcome.final,
        "probes": outcome.probes,
        "factory": outcome.factory,
        "factory_refusals": outcome.factory_refusals,
        "issuances": outcome.issuances,
        "revocations": outcome.revocations,
        "events": [
            {"at": at, "kind": kind, "detail": detail}
            for at, kind, detail in outcome.events
        ],
    }


def gaps(outcome: Outcome) -> dict[str, float]:
    """Each device's longest silence between heartbeats, in seconds."""
    times: dict[str, list[float]] = {}
    for beat in outcome.beats:
        times.setdefault(beat.device_id, []).append(beat.at)
    # A device that fell silent is silent until the last heartbeat the
    # monitor heard from anyone.
    last = max((beat.at for beat in outcome.beats), default=0.0)
    longest = {}
    for device_id, moments in times.items():
        moments.sort()
        moments.append(last)
        steps = [b - a for a, b in itertools.pairwise(moments)]
        longest[device_id] = max(steps, default=0.0)
    return dict(sorted(longest.items()))


def renewal_counts(outcome: Outcome) -> dict[str, int]:
    """Operational certificates issued per device (the first enrolls)."""
    counts: dict[str, int] = {}
    for issued in outcome.issuances:
        counts[issued["device_id"]] = counts.get(issued["device_id"], 0) + 1
    return dict(sorted(counts.items()))


# Every plot a run may draw, so a new run can clear the last one's.
PLOT_FILES = ("renewals.png", "expiry.png", "gaps.png", "storm.png")


def fleet_size(outcome: Outcome) -> str:
    """The devices of a run, the clone told apart from the genuine ones."""
    roles = [d.role for d in outcome.plan.devices]
    clones = roles.count("clone")
    genuine = len(roles) - clones
    text = f"{genuine} device{'s' if genuine != 1 else ''}"
    if clones == 1:
        text += " and a clone"
    elif clones:
        text += f" and {clones} clones"
    return text


def write(outcome: Outcome, directory: Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    # A previous run into the same directory may have drawn plots this
    # scenario does not (the storm's): left behind they would pass for
    # this run's.
    for name in PLOT_FILES:
        (directory / name).unlink(missing_ok=True)
    plots = {
        "renewals": _plot_renewals(outcome, directory / "renewals.png"),
        "expiry": _plot_expiry(outcome, directory / "expiry.png"),
        "gaps": _plot_gaps(outcome, directory / "gaps.png"),
    }
    if outcome.storm.get("buckets"):
        plots["storm"] = _plot_storm(outcome, directory / "storm.png")

    report = {
        "deterministic": deterministic(outcome),
        "measured": measured(outcome),
    }
    json_path = directory / JSON_FILE
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown_path = directory / MARKDOWN_FILE
    markdown_path.write_text(_markdown(outcome, report, plots))
    logger.info("report written to %s", directory)
    return {"json": json_path, "markdown": markdown_path, **plots}


def _markdown(
    outcome: Outcome, report: dict[str, Any], plots: dict[str, Path]
) -> str:
    plan = outcome.plan
    figures = report["measured"]
    lines = [
        f"# Fleet report: {plan.scenario}, {fleet_size(outcome)}, "
        f"seed {plan.seed}",
        "",
        f"Key store: {_key_stores(outcome)}. Certificate lifetime "
        f"{plan.lifetime} s, heartbeat every {plan.heartbeat:g} s. "
        f"Wall time {figures['wall_s']:.1f} s; resident memory of every "
        f"process of the fleet (agents, TPMs, broker, runner) at most "
        f"{figures['peak_rss_mb']:.0f} MB.",
        "",
    ]
    expected = expected_evidence(outcome)
    if expected:
        lines += [expected, ""]
    lines += [
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for name in sorted(outcome.checks):
        verdict = _verdict(outcome, name)
        lines.append(
            f"| {name} | {verdict} | {outcome.details.get(name, '')} |"
        )

    lines += [
        "",
        "## Devices",
        "",
        "| device | serial | role | must end | reached | state | "
        "identity | operational certificates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    counts = renewal_counts(outcome)
    for device in plan.devices:
        final = outcome.final.get(device.device_id, {})
        reached = outcome.reached.get(device.device_id)
        lines.append(
            f"| {device.device_id} | {device.serial} | {device.role} | "
            f"{device.expected} | {'yes' if reached else '**no**'} | "
            f"{final.get('state', '-')} | {final.get('identity') or '-'} | "
            f"{counts.get(device.device_id, 0)} |"
        )

    if outcome.storm.get("buckets"):
        storm = outcome.storm
        lines += [
            "",
            "## Renewal storm",
            "",
            f"{storm['requests']} renewals of identical certificates, in "
            f"buckets of {storm['bucket_s']:.2f} s (the renewal window "
            f"of {storm.get('window_s', 0):.1f} s cut so each bucket "
            f"expects a few): busiest {storm['peak']}, mean over the "
            f"window {storm['mean']:.1f}, peak over mean "
            f"**{storm['peak_over_mean']:.2f}**.",
        ]
        if STORM_CHECK in outcome.unjudged:
            lines[-1] += (
                f" The spread is not judged: {outcome.unjudged[STORM_CHECK]}."
            )

    for title, key in (
        ("Renewals over time", "renewals"),
        ("Renewal storm spread", "storm"),
        ("Certificate expiry", "expiry"),
        ("Connection gaps", "gaps"),
    ):
        if key in plots:
            lines += ["", f"![{title}]({plots[key].name})"]

    lines += _records_markdown(outcome)
    lines += ["", "## Phases (wall time)", ""]
    for name, seconds in figures["phases_s"].items():
        lines.append(f"- {name}: {seconds:.1f} s")
    return "\n".join(lines) + "\n"


def _verdict(outcome: Outcome, name: str) -> str:
    """The result of a check: FAIL in bold, and why one is not judged."""
    verdict = outcome.verdict(name)
    if verdict == "FAIL":
        return "**FAIL**"
    why = outcome.unjudged.get(name)
    return f"{verdict}: {why}" if why else verdict


def _records_markdown(outcome: Outcome) -> list[str]:
    serial_of = {f["device_id"]: f["device_serial"] for f in outcome.factory}
    lines = [
        "",
        "## Issuance records",
        "",
        "| device serial | device | IDevID | EK certificate (sha256) | "
        "operational certificates |",
        "|---|---|---|---|---|",
    ]
    issued: dict[str, list[str]] = {}
    for issuance in outcome.issuances:
        issued.setdefault(issuance["device_id"], []).append(
            issuance["serial"][:12]
        )
    for record in outcome.factory:
        ek = record["ek_cert_sha256"]
        lines.append(
            f"| {record['device_serial']} | {record['device_id']} | "
            f"{record['idevid_serial'][:12]} | "
            f"{ek[:16] + '...' if ek else 'none'} | "
            f"{', '.join(issued.get(record['device_id'], [])) or '-'} |"
        )
    lines += ["", "## Revocations", ""]
    if not outcome.revocations:
        lines.append("None.")
    else:
        lines += [
            "| device | device serial | certificate | kind | status | "
            "revoked at |",
            "|---|---|---|---|---|---|",
        ]
        for entry in outcome.revocations:
            lines.append(
                f"| {entry['device_id']} | "
                f"{serial_of.get(entry['device_id'], '?')} | "
                f"{entry['serial'][:12]} | {entry['kind']} | "
                f"{entry['status']} | {entry['revoked_at']} |"
            )
    if outcome.factory_refusals:
        lines += ["", "## Refused at the factory", ""]
        for refusal in outcome.factory_refusals:
            lines.append(
                f"- {refusal['device_id']} (serial "
                f"{refusal['device_serial']}): {refusal['reason']}"
            )
    return lines


def expected_evidence(outcome: Outcome) -> str | None:
    """What ``firmware-sim evidence`` will flag in this run by design.

    A fleet device with a software key fails "private key never
    exported" there: rightly, as its key is not hardware-protected. The
    clone scenario gives its original board one on purpose, so that the
    key can be copied; said here, the finding reads as expected rather
    than as a fault of the run.
    """
    software = [
        d.device_id
        for d in outcome.plan.devices
        if d.key_store == "software" and d.role != "clone"
    ]
    if not software:
        return None
    why = "its key is in a software key store, not hardware-protected"
    if outcome.plan.scenario == "clone" and len(software) == 1:
        why = (
            "the clone scenario gives the board it clones a software key, "
            "so that the key can be copied; it is not hardware-protected"
        )
    fleet = [d for d in outcome.plan.devices if d.role != "clone"]
    which = ", ".join(software)
    if len(software) == len(fleet) > 1:
        which = "every device"
    return (
        f"Evidence to expect: 'firmware-sim evidence' on this run reports "
        f'NOT MET for "private key never exported" on {which}: {why}.'
    )


def _key_stores(outcome: Outcome) -> str:
    """The key store each device used, software-key ones by name."""
    named = {"tpm": "TPM (swtpm)", "software": "software, NOT hardware"}
    by_store: dict[str, list[str]] = {}
    for device in outcome.plan.devices:
        label = device.device_id
        if device.role == "clone":
            label += " (the clone)"
        by_store.setdefault(device.key_store, []).append(label)
    if len(by_store) == 1:
        return named[next(iter(by_store))]
    # Mixed: the devices without a TPM are the ones to name.
    common = "tpm"
    parts = [f"{named[common]} for the others"]
    for store, labels in sorted(by_store.items()):
        if store != common:
            parts.insert(0, f"{', '.join(labels)}: {named[store]}")
    return "; ".join(parts)


# The colour of each intervention on the renewals plot, in row order.
_INTERVENTIONS = {
    "revoke": "tab:red",
    "decommission": "tab:purple",
    "reset": "tab:orange",
    "outage": "tab:gray",
}
OUTAGE_DOWN = "broker and registrar down"


def intervention_counts(outcome: Outcome) -> dict[str, int]:
    """How many of each intervention the run made, for the plot's labels.

    An outage is two events (down, back) but one outage.
    """
    counts: dict[str, int] = {}
    for _, kind, detail in outcome.events:
        if kind == "outage" and not detail.startswith(OUTAGE_DOWN):
            continue
        if kind in _INTERVENTIONS:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _plot_renewals(outcome: Outcome, path: Path) -> Path:
    return _save(renewals_figure(outcome), path)


def renewals_figure(outcome: Outcome) -> Figure:
    """Certificates issued over time, and the interventions below them."""
    counts = intervention_counts(outcome)
    kinds = [kind for kind in _INTERVENTIONS if kind in counts]
    # Revocations and decommissions happen in the same second, so lines
    # across the plot would hide each other: each kind gets a row of
    # its own in a strip below, on the same time axis.
    figure, axes_list = plt.subplots(
        2 if kinds else 1,
        1,
        sharex=True,
        squeeze=False,
        figsize=(8, 4 + 0.3 * len(kinds)),
        height_ratios=[4, 0.5 + 0.4 * len(kinds)] if kinds else [1],
        layout="constrained",
    )
    axes = axes_list[0][0]
    times = sorted(i["issued_at"] - outcome.started for i in outcome.issuances)
    axes.step(
        times,
        range(1, len(times) + 1),
        where="post",
        color="tab:blue",
        zorder=3,
    )
    # A plain guide at each moment something was done; the strip says
    # what, so no kind's line lies over another's.
    moments = {at for at, kind, _ in outcome.events if kind in _INTERVENTIONS}
    for at in sorted(moments):
        axes.axvline(
            at - outcome.started, color="0.5", linestyle=":", linewidth=1
        )
    axes.set_ylabel("operational certificates issued")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title("Enrollments and renewals over time, with interventions")
    axes.grid(alpha=0.3)
    bottom = axes
    if kinds:
        bottom = axes_list[1][0]
        _draw_interventions(bottom, outcome, kinds, counts)
    bottom.set_xlabel("seconds since the run started")
    return figure


def _draw_interventions(
    axes: Any, outcome: Outcome, kinds: list[str], counts: dict[str, int]
) -> None:
    """One row per kind of intervention: a tick each, a bar per outage."""
    for row, kind in enumerate(kinds):
        color = _INTERVENTIONS[kind]
        if kind == "outage":
            spans = _outage_spans(outcome)
            axes.broken_barh(spans, (row - 0.3, 0.6), color=color)
            continue
        moments = [
            at - outcome.started
            for at, made, _ in outcome.events
            if made == kind
        ]
        axes.plot(
            moments,
            [row] * len(moments),
            linestyle="none",
            marker="|",
            markersize=14,
            markeredgewidth=2,
            color=color,
        )

    axes.set_yticks(
        range(len(kinds)), [f"{kind} ({counts[kind]})" for kind in kinds]
    )
    axes.set_ylim(len(kinds) - 0.5, -0.5)
    axes.grid(axis="x", alpha=0.3)


def _outage_spans(outcome: Outcome) -> list[tuple[float, float]]:
    """(start, length) of each outage; one never ended lasts to the end."""
    spans = []
    down: float | None = None
    for at, kind, detail in outcome.events:
        if kind != "outage":
            continue
        moment = at - outcome.started
        if detail.startswith(OUTAGE_DOWN):
            down = moment
        elif down is not None:
            spans.append((down, moment - down))
            down = None
    if down is not None:
        spans.append((down, outcome.finished - outcome.started - down))
    return spans


def _plot_storm(outcome: Outcome, path: Path) -> Path:
    storm = outcome.storm
    figure, axes = plt.subplots(figsize=(8, 4), layout="constrained")
    starts = [
        storm["first_s"] + n * storm["bucket_s"]
        for n in range(len(storm["buckets"]))
    ]
    axes.bar(
        starts,
        storm["buckets"],
        width=storm["bucket_s"] * 0.9,
        align="edge",
        color="tab:blue",
    )
    axes.axhline(storm["mean"], color="black", label="mean")
    axes.axhline(
        2 * storm["mean"], color="tab:red", linestyle="--", label="2 x mean"
    )
    axes.set_xlabel("seconds after the identical certificates were issued")
    axes.set_ylabel("renewal requests per bucket")
    axes.set_title(
        f"Renewal storm: {fleet_size(outcome)}, peak over mean "
        f"{storm['peak_over_mean']:.2f}"
    )
    axes.legend()
    return _save(figure, path)


def _plot_expiry(outcome: Outcome, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4), layout="constrained")
    latest: dict[str, float] = {}
    for issued in outcome.issuances:
        latest[issued["device_id"]] = issued["not_after"]
    left = [moment - outcome.finished for moment in latest.values()]
    axes.hist(left, bins=min(30, max(5, len(left) // 2)), color="tab:green")
    axes.axvline(0, color="tab:red", label="end of run")
    axes.set_xlabel(
        "seconds from the end of the run to the expiry of each device's "
        "latest operational certificate"
    )
    axes.set_ylabel("devices")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title("Certificate expiry distribution")
    axes.legend()
    return _save(figure, path)


def _plot_gaps(outcome: Outcome, path: Path) -> Path:
    return _save(gaps_figure(outcome), path)


def gaps_figure(outcome: Outcome) -> Figure:
    """Each device's longest silence, as a bar, against two heartbeats."""
    longest = gaps(outcome)
    roles = {d.device_id: d.role for d in outcome.plan.devices}
    names = list(longest)
    figure, axes = plt.subplots(
        figsize=(8, max(3, 0.18 * len(names) + 1)), layout="constrained"
    )
    colours = [
        "tab:blue" if roles.get(n) == "keep" else "tab:orange" for n in names
    ]
    axes.barh(range(len(names)), list(longest.values()), color=colours)
    size = 8 if len(names) <= 20 else 5
    axes.set_yticks(range(len(names)), names, fontsize=size)
    axes.axvline(
        2 * outcome.plan.heartbeat,
        color="tab:red",
        linestyle="--",
        label="two heartbeats",
    )
    axes.set_xlabel(
        "longest gap between heartbeats over the whole run, seconds"
    )
    axes.set_title(
        "Connection gaps per device (orange: revoked, reset or decommissioned)"
    )
    # Inside the axes the legend would cover the bars of some devices.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
