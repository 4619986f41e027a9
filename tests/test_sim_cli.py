"""firmware-sim registrar and demo commands: bad input, signals."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sim_cli import assert_refused, invoke, tree

from firmware_sim.ca import key_pem

DEMO_DIR = re.compile(r"trust anchor (/tmp/device-agent-demo-[^/\s]+)/")
BROKER_STARTED_WITHIN = 90


@pytest.fixture(scope="module")
def registrar_dir(tmp_path_factory):
    """A registrar directory made by 'registrar init', with one device."""
    directory = tmp_path_factory.mktemp("registrar") / "registrar"
    init = invoke(["registrar", "init", "--dir", str(directory)])
    assert init.exit_code == 0, init.output
    added = invoke(["registrar", "add", "dev-1", "--dir", str(directory)])
    assert added.exit_code == 0, added.output
    return directory


INIT_REFUSALS = {
    "empty dir": (["--dir", ""], "--dir"),
    "dir under a file": (["--dir", "{tmp}/file/x"], "file"),
    "long name": (["--name", "x" * 65], "--name"),
    "name too long for the intermediate": (["--name", "x" * 49], "--name"),
    "empty name": (["--name", ""], "--name"),
    "name with a newline": (["--name", "a\nb"], "--name"),
}


@pytest.mark.parametrize(
    ("args", "named"), INIT_REFUSALS.values(), ids=INIT_REFUSALS.keys()
)
def test_registrar_init_refuses_bad_input_in_one_line(tmp_path, args, named):
    (tmp_path / "file").write_text("x")
    args = [arg.format(tmp=tmp_path) for arg in args]
    before = tree(tmp_path)

    result = invoke(
        ["registrar", "init", "--dir", str(tmp_path / "reg"), *args]
    )

    assert_refused(result, named)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "name", ["registrar.key", "registrar.pem", "registry.sqlite"]
)
def test_registrar_init_refuses_a_directory_where_a_file_belongs(
    tmp_path, name
):
    """No half-made layout, and no private key left in a partial file."""
    directory = tmp_path / "reg"
    directory.mkdir()
    (directory / name).mkdir()
    before = tree(tmp_path)

    result = invoke(["registrar", "init", "--dir", str(directory)])

    assert_refused(result, name)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("again", [[], ["--name", "Device Operations"]])
def test_registrar_init_again_says_what_it_keeps(tmp_path, again):
    directory = str(tmp_path / "reg")
    assert invoke(["registrar", "init", "--dir", directory]).exit_code == 0
    before = tree(tmp_path)

    result = invoke(["registrar", "init", "--dir", directory, *again])

    assert result.exit_code == 0, result.output
    assert "'Device Operations' exists" in result.output
    assert "is kept" in result.output
    assert tree(tmp_path) == before


def test_registrar_init_again_refuses_another_name(tmp_path):
    directory = str(tmp_path / "reg")
    made = invoke(["registrar", "init", "--dir", directory, "--name", "Ops"])
    assert made.exit_code == 0, made.output
    before = tree(tmp_path)

    result = invoke(
        ["registrar", "init", "--dir", directory, "--name", "Other Ops"]
    )

    assert_refused(result, "--name 'Other Ops'")
    assert "'Ops'" in result.output
    assert tree(tmp_path) == before


SERIAL_REFUSALS = {
    "empty": "",
    "blank": "  ",
    "too long": "x" * 65,
    "newline": "SN\n1",
    "tab": "SN\t1",
}


@pytest.mark.parametrize(
    "serial", SERIAL_REFUSALS.values(), ids=SERIAL_REFUSALS.keys()
)
def test_registrar_add_refuses_a_bad_serial(registrar_dir, serial):
    before = invoke(["registrar", "list", "--dir", str(registrar_dir)])

    directory = str(registrar_dir)

    result = invoke(
        ["registrar", "add", "dev-2", "--serial", serial, "--dir", directory]
    )

    assert_refused(result, "--serial")
    after = invoke(["registrar", "list", "--dir", str(registrar_dir)])
    assert after.output == before.output


def test_registrar_add_takes_a_serial_of_64_characters(tmp_path):
    directory = str(tmp_path / "reg")
    assert invoke(["registrar", "init", "--dir", directory]).exit_code == 0

    result = invoke(
        ["registrar", "add", "dev-9", "--serial", "S" * 64, "--dir", directory]
    )

    assert result.exit_code == 0, result.output
    listed = invoke(["registrar", "list", "--dir", directory])
    assert f"serial={'S' * 64}" in listed.output


@pytest.mark.parametrize("command", ["add", "revoke", "decommission"])
@pytest.mark.parametrize("directory", ["", "{tmp}/file/x"])
def test_registrar_device_commands_refuse_a_bad_dir(
    tmp_path, command, directory
):
    (tmp_path / "file").write_text("x")
    directory = directory.format(tmp=tmp_path)

    result = invoke(["registrar", command, "dev-1", "--dir", directory])

    assert_refused(result, "--dir")


RUN_REFUSALS = {
    "huge lifetime": (["--lifetime", "99999999999999"], "--lifetime"),
    "zero lifetime": (["--lifetime", "0"], "--lifetime"),
    "negative backdate": (["--backdate", "-1"], "--backdate"),
    "huge backdate": (["--backdate", "99999999999"], "--backdate"),
    "zero max lifetime": (["--max-lifetime", "0"], "--max-lifetime"),
    "huge max lifetime": (["--max-lifetime", "9" * 20], "--max-lifetime"),
    "port in another script": (["--broker", "host:\u0663"], "--broker"),
    "port 0": (["--broker", "host:0"], "--broker"),
    "port too large": (["--broker", "host:65536"], "--broker"),
    "no host": (["--broker", ":1883"], "--broker"),
    "host too long": (["--broker", "a" * 300 + ":1883"], "--broker"),
    "label too long": (["--broker", "a" * 64 + ".example:1"], "--broker"),
    "host with a space": (["--broker", "a b:1883"], "--broker"),
    "empty label": (["--broker", "a..b:1883"], "--broker"),
    "ca file is empty": (["--ca-file", ""], "--ca-file"),
    "ca file is a fifo": (["--ca-file", "{tmp}/fifo"], "--ca-file"),
    "ca file is a device": (["--ca-file", "/dev/null"], "--ca-file"),
    "ca file is missing": (["--ca-file", "{tmp}/none.pem"], "--ca-file"),
    "ca file holds a key": (
        ["--ca-file", "{tmp}/key.pem"],
        "key.pem holds no PEM certificate",
    ),
    "ca file has nothing in it": (
        ["--ca-file", "{tmp}/nothing.pem"],
        "nothing.pem holds no PEM certificate",
    ),
}


@pytest.mark.parametrize(
    ("args", "named"), RUN_REFUSALS.values(), ids=RUN_REFUSALS.keys()
)
def test_registrar_run_refuses_bad_input_before_connecting(
    registrar_dir, tmp_path, args, named
):
    os.mkfifo(tmp_path / "fifo")
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    (tmp_path / "nothing.pem").write_bytes(b"")
    options = {"--broker": "127.0.0.1:1", "--dir": str(registrar_dir)}
    options["--ca-file"] = str(registrar_dir / "ca" / "root.pem")
    options.update(zip(args[::2], args[1::2], strict=True))
    argv = ["registrar", "run"]
    for option, value in options.items():
        argv += [option, value.format(tmp=tmp_path)]

    result = invoke(argv)

    assert_refused(result, named)
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--device-id", "a/b"], "--device-id"),
        (["--device-id", "registrar"], "--device-id"),
        (["--device-id", "x" * 65], "--device-id"),
        (["--keep", ""], "--keep"),
        (["--keep", "{tmp}/file/x"], "file"),
        (["--keep", "{tmp}/file"], "file"),
        (["--keep", "{tmp}/dangling"], "dangling"),
    ],
)
def test_demo_refuses_bad_input_before_starting_anything(
    tmp_path, args, named
):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    args = [arg.format(tmp=tmp_path) for arg in args]
    before = tree(tmp_path)

    started = time.monotonic()
    result = invoke(["demo", "--key-store", "software", *args])

    assert_refused(result, named)
    assert time.monotonic() - started < 5
    assert tree(tmp_path) == before


@pytest.mark.parametrize("key_store", ["software", "tpm"])
def test_sigterm_stops_the_demo_and_everything_it_started(key_store):
    """SIGTERM unwinds like Ctrl-C: no swtpm, mosquitto or files left."""
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "demo",
            "--key-store",
            key_store,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        workdir = _wait_for_broker(demo)
        started = _servers_of(demo.pid, workdir)
        assert any(b"mosquitto" in cmdline for cmdline in started.values())
        if key_store == "tpm":
            assert any(b"swtpm" in cmdline for cmdline in started.values())

        demo.send_signal(signal.SIGTERM)
        _, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    assert demo.returncode == 128 + signal.SIGTERM
    assert stderr == "error: stopped by SIGTERM\n"
    assert [pid for pid in started if _alive(pid)] == []
    assert not workdir.exists()
    for cmdline in started.values():
        config = _mosquitto_config(cmdline)
        if config is not None:
            assert not config.parent.exists()


def _wait_for_broker(demo):
    """Read the demo's output up to the broker's port line; its workdir."""
    workdir = None
    broker_seen = False
    deadline = time.monotonic() + BROKER_STARTED_WITHIN
    while time.monotonic() < deadline:
        line = demo.stdout.readline()
        if not line:
            pytest.fail(f"demo ended early: {demo.stderr.read()}")
        match = DEMO_DIR.search(line)
        if match and workdir is None:
            workdir = Path(match[1])
        if "Starting mosquitto" in line:
            broker_seen = True
        elif broker_seen and line.strip().startswith("port "):
            assert workdir is not None
            return workdir
    pytest.fail("the demo did not start its broker in time")


def _servers_of(demo_pid, workdir):
    """Live swtpm and mosquitto processes that serve this demo, by pid.

    swtpm daemonizes, but names the demo's directory on its command line;
    mosquitto works in a directory of its own, as a child of the demo.
    """
    servers = {}
    for pid, cmdline in _processes():
        name = cmdline.split(b"\0")[0]
        if name.endswith(b"swtpm") and bytes(workdir) in cmdline:
            servers[pid] = cmdline
        if name.endswith(b"mosquitto") and _parent(pid) == demo_pid:
            servers[pid] = cmdline
    return servers


def _mosquitto_config(cmdline):
    args = cmdline.split(b"\0")
    if not args[0].endswith(b"mosquitto") or b"-c" not in args:
        return None
    return Path(os.fsdecode(args[args.index(b"-c") + 1]))


def _processes():
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                yield int(proc.name), (proc / "cmdline").read_bytes()
            except OSError:
                continue


def _parent(pid):
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rpartition(")")[2].split()[1])


def _alive(pid):
    """Whether ``pid`` runs; a zombie that init has yet to reap does not."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rpartition(")")[2].split()[0] not in ("Z", "X")


@pytest.mark.parametrize("scenario", ["lifecycle", "storm", "outage", "clone"])
def test_fleet_too_small_for_its_scenario_is_a_usage_error(tmp_path, scenario):
    from firmware_sim.fleet import MINIMUM_DEVICES

    minimum = MINIMUM_DEVICES[scenario]
    out = tmp_path / "report"

    result = invoke([
        "fleet", "--devices", str(minimum - 1), "--scenario", scenario,
        "--software-keys", "--out", str(out),
    ])  # fmt: skip

    assert_refused(result, f"needs at least {minimum} devices")
    assert "--devices" in result.output
    assert result.exit_code == 2
    assert not out.exists()


def test_fleet_minimums_are_those_the_readme_and_help_list():
    from firmware_sim.cli_fleet import fleet
    from firmware_sim.fleet import MINIMUM_DEVICES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    listed = readme.split("Scenarios (minimum devices):", 1)[1][:600]
    help_text = next(p.help for p in fleet.params if p.name == "scenario")
    for scenario, minimum in MINIMUM_DEVICES.items():
        assert f"`{scenario}` ({minimum};" in listed
        assert re.search(
            rf"{scenario} \([^)]*at least {minimum}",
            " ".join(help_text.split()),
        ), (scenario, help_text)
