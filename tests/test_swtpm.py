"""swtpm control: start, status across processes, flush, ports, CLI."""

import json
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import edge_command
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_RC
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_PUBLIC

from tpm_simulator import cli
from tpm_simulator.errors import PortInUseError, SimulatorError
from tpm_simulator.ports import HIGHEST, free_port, free_port_pair
from tpm_simulator.swtpm import Swtpm

PERSISTENT = 0x81000010


def test_started_swtpm_answers_and_names_its_tcti(swtpm):
    assert swtpm.running
    assert swtpm.answers()
    assert swtpm.tcti == f"swtpm:host=127.0.0.1,port={swtpm.port}"
    assert int(swtpm.pid_path.read_text()) == swtpm.pid

    with ESAPI(swtpm.tcti) as ectx:
        assert len(ectx.get_random(16)) == 16


def test_stop_ends_the_process_and_removes_the_pid_file(swtpm):
    pid = swtpm.pid

    swtpm.stop()

    assert not swtpm.running
    assert not swtpm.pid_path.exists()
    assert not _alive(pid)
    assert swtpm.status()["running"] is False
    swtpm.stop()  # stopping a stopped swtpm is a no-op


def test_state_survives_a_restart(swtpm):
    with ESAPI(swtpm.tcti) as ectx:
        primary = _create_primary(ectx)
        ectx.evict_control(ESYS_TR.OWNER, primary, PERSISTENT)

    swtpm.stop()
    swtpm.start()

    assert PERSISTENT in _persistent_handles(swtpm)


def test_status_and_stop_work_from_another_process(swtpm):
    status = _run_cli("status", "--state-dir", str(swtpm.state_dir))
    assert status.returncode == 0, status.stderr
    assert f"pid: {swtpm.pid}" in status.stdout
    assert "answers: True" in status.stdout

    pid = swtpm.pid
    stopped = _run_cli("stop", "--state-dir", str(swtpm.state_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert not swtpm.running

    status = _run_cli("status", "--state-dir", str(swtpm.state_dir))
    assert status.returncode == 3
    assert "running: False" in status.stdout
    assert stopped.stdout == (
        f"stopped swtpm (pid {pid}) in {swtpm.state_dir}\n"
    )
    assert stopped.stderr == ""


def test_cli_stop_of_a_stopped_swtpm_says_none_was_running(tmp_path):
    with Swtpm(tmp_path / "tpm", free_port_pair()) as tpm:
        pass

    stopped = _run_cli("stop", "--state-dir", str(tpm.state_dir))

    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == f"no swtpm was running in {tpm.state_dir}\n"
    assert stopped.stderr == ""


def test_cli_status_of_a_state_dir_never_started_is_down(tmp_path):
    """Down is exit 3, as for a stopped swtpm; nothing is created."""
    state = tmp_path / "tpm"
    state.mkdir()
    before = sorted(tmp_path.rglob("*"))

    result = _run_cli("status", "--state-dir", str(state))
    as_json = _run_cli("status", "--state-dir", str(state), "--json")

    assert result.returncode == 3, result.stderr
    assert "running: False" in result.stdout
    assert "answers: False" in result.stdout
    assert result.stderr == ""
    assert as_json.returncode == 3, as_json.stderr
    facts = json.loads(as_json.stdout)
    assert facts["running"] is False
    assert facts["answers"] is False
    assert facts["state_dir"] == str(state)
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_status_of_a_state_dir_that_does_not_exist_is_an_error(
    tmp_path,
):
    """A mistyped path is said in one line, not shown as a TPM down."""
    state = tmp_path / "nonexistent"

    result = _run_cli("status", "--state-dir", str(state))

    assert result.returncode == 1
    _assert_one_line_naming(result, f"{state}: no such directory")
    assert result.stdout == ""
    assert not state.exists()


def test_cli_status_refuses_a_state_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")

    result = _run_cli("status", "--state-dir", str(tmp_path / "file" / "tpm"))

    assert result.returncode == 1
    _assert_one_line_naming(result, "file")
    assert (tmp_path / "file").read_text() == "x"


def test_starting_twice_is_refused(swtpm):
    with pytest.raises(SimulatorError, match="already runs"):
        Swtpm(swtpm.state_dir, swtpm.port).start()


def test_a_taken_port_is_reported_as_such(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]

        with pytest.raises(PortInUseError) as info:
            Swtpm(tmp_path / "tpm", port).start()

    assert info.value.port == port


def test_flush_frees_the_slots_a_killed_client_left(swtpm):
    """A SIGKILLed client's loaded keys stay in swtpm until flushed."""
    blob = _load_and_die(swtpm, loads=2)
    assert len(swtpm.transient_handles()) == 2

    # Loading needs a slot for the parent too: two leftovers fill swtpm.
    key = TSSPrivKey.from_pem(blob)
    with ESAPI(swtpm.tcti) as ectx, pytest.raises(TSS2_Exception) as info:
        key.load(ectx)
    assert info.value.error == TPM2_RC.OBJECT_MEMORY

    assert swtpm.flush() == 2
    assert swtpm.transient_handles() == []
    with ESAPI(swtpm.tcti) as ectx:
        ectx.flush_context(key.load(ectx))


def test_flush_of_an_empty_tpm_flushes_nothing(swtpm):
    assert swtpm.flush() == 0


def test_commands_are_logged_for_counting(swtpm):
    before = swtpm.commands_logged()

    with ESAPI(swtpm.tcti) as ectx:
        for _ in range(3):
            ectx.get_random(8)

    assert swtpm.commands_logged() >= before + 3


def test_context_manager_starts_and_stops(tmp_path):
    tpm = Swtpm(tmp_path / "tpm", free_port_pair())

    with tpm:
        assert tpm.answers()

    assert not tpm.running


def test_free_ports_are_below_the_ephemeral_range_and_bindable():
    first = free_port_pair()
    single = free_port()

    assert first + 1 <= HIGHEST
    assert single <= HIGHEST
    assert single not in (first, first + 1)
    for port in (first, first + 1, single):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_cli_start_flush_stop(tmp_path):
    state = str(tmp_path / "tpm")
    runner = CliRunner()

    started = runner.invoke(
        edge_command(cli.run), ["start", "--state-dir", state]
    )
    assert started.exit_code == 0, started.output
    try:
        assert started.output.startswith("swtpm:host=127.0.0.1,port=")
        flushed = runner.invoke(
            edge_command(cli.run), ["flush", "--state-dir", state]
        )
        assert flushed.output == "flushed 0\n"
    finally:
        stopped = runner.invoke(
            edge_command(cli.run), ["stop", "--state-dir", state]
        )
    assert stopped.exit_code == 0


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    result = _run_cli("stop", "--state-dir", str(tmp_path / "none"))

    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no swtpm was started" in result.stderr
    assert "Traceback" not in result.stderr


def _run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tpm_simulator", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=cwd,
    )


def _load_and_die(swtpm, loads):
    """Create a key, load it ``loads`` times in a child, SIGKILL the child."""
    with ESAPI(swtpm.tcti) as ectx:
        blob = TSSPrivKey.create_ecc(ectx).to_pem()

    child = textwrap.dedent(f"""
        import os, signal, sys
        from tpm2_pytss import ESAPI
        from tpm2_pytss.tsskey import TSSPrivKey
        key = TSSPrivKey.from_pem(sys.stdin.buffer.read())
        ectx = ESAPI({swtpm.tcti!r})
        for _ in range({loads}):
            key.load(ectx)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run(
        [sys.executable, "-c", child], input=blob, timeout=30, check=False
    )
    assert done.returncode == -signal.SIGKILL
    return blob


def _create_primary(ectx):
    template = TPM2B_PUBLIC.parse(
        "ecc256:aes128cfb",
        objectAttributes="fixedtpm|fixedparent|sensitivedataorigin"
        "|userwithauth|restricted|decrypt|noda",
    )
    handle, *_ = ectx.create_primary(None, template)
    return handle


def _persistent_handles(swtpm):
    with ESAPI(swtpm.tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, 0x81000000, 64)
    return list(data.data.handles)


def _alive(pid):
    """Whether ``pid`` runs; a zombie that init has yet to reap does not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("timeout", ["nan", "-1", "0", "inf", "-inf"])
def test_cli_start_refuses_a_timeout_that_is_not_positive_and_finite(
    tmp_path, timeout
):
    state = tmp_path / "tpm"

    result = _run_cli("start", "--state-dir", str(state), "--timeout", timeout)

    assert result.returncode == 2
    _assert_one_line_naming(result, "--timeout")
    assert not state.exists()


@pytest.mark.parametrize("content", ["99999999", "-5", "garbage", "65535"])
@pytest.mark.parametrize("command", ["start", "status", "stop", "flush"])
def test_cli_names_a_port_file_that_holds_no_port(tmp_path, command, content):
    port_file = tmp_path / "swtpm.port"
    port_file.write_text(f"{content}\n")

    result = _run_cli(command, "--state-dir", str(tmp_path))

    assert result.returncode == 1
    _assert_one_line_naming(result, "swtpm.port")
    assert port_file.read_text() == f"{content}\n"
    assert not (tmp_path / "swtpm.pid").exists()


@pytest.mark.parametrize("command", ["start", "status", "stop", "flush"])
def test_cli_names_a_port_file_that_is_a_directory(tmp_path, command):
    (tmp_path / "swtpm.port").mkdir()

    result = _run_cli(command, "--state-dir", str(tmp_path))

    assert result.returncode == 1
    _assert_one_line_naming(result, "swtpm.port")
    assert (tmp_path / "swtpm.port").is_dir()


def test_cli_start_on_a_given_port_reports_a_port_file_it_cannot_replace(
    tmp_path,
):
    (tmp_path / "swtpm.port").mkdir()

    result = _run_cli(
        "start", "--state-dir", str(tmp_path), "--port", str(free_port_pair())
    )

    assert result.returncode == 1
    _assert_one_line_naming(result, "swtpm.port")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swtpm.port"]


def test_start_replaces_a_symlinked_port_file_instead_of_its_target(
    tmp_path,
):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    state = tmp_path / "tpm"
    state.mkdir()
    (state / "swtpm.port").symlink_to(target)

    with Swtpm(state, free_port_pair()) as tpm:
        assert (state / "swtpm.port").read_text() == f"{tpm.port}\n"

    assert target.read_text() == "keep me\n"
    assert not (state / "swtpm.port").is_symlink()


@pytest.mark.parametrize("state_dir", ["", " "])
@pytest.mark.parametrize("command", ["start", "status", "stop", "flush"])
def test_cli_refuses_an_empty_state_dir(tmp_path, command, state_dir):
    result = _run_cli(command, "--state-dir", state_dir, cwd=tmp_path)

    assert result.returncode == 2
    _assert_one_line_naming(result, "--state-dir")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_state_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")

    result = _run_cli("start", "--state-dir", str(tmp_path / "file" / "tpm"))

    assert result.returncode == 1
    _assert_one_line_naming(result, "file")
    assert (tmp_path / "file").read_text() == "x"


def test_cli_refuses_a_state_dir_with_a_comma(tmp_path):
    state = tmp_path / "a,b"

    result = _run_cli("start", "--state-dir", str(state))

    assert result.returncode == 1
    _assert_one_line_naming(result, "comma")
    assert not state.exists()


def test_cli_starts_and_stops_with_a_relative_state_dir(tmp_path):
    """swtpm changes to / as it daemonizes; the state dir must not move."""
    started = _run_cli("start", "--state-dir", "tpm", cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        status = _run_cli("status", "--state-dir", "tpm", cwd=tmp_path)
        assert "answers: True" in status.stdout
        assert (tmp_path / "tpm" / "swtpm.pid").exists()
    finally:
        stopped = _run_cli("stop", "--state-dir", "tpm", cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert _swtpm_pids(tmp_path) == []


def test_cli_start_that_times_out_leaves_no_swtpm_running(tmp_path):
    state = tmp_path / "tpm"

    result = _run_cli("start", "--state-dir", str(state), "--timeout", "1e-6")

    assert result.returncode == 1
    _assert_one_line_naming(result, "did not daemonize in 1e-06 s")
    assert not result.stderr.rstrip().endswith(":")
    assert _swtpm_pids(state) == []


def test_cli_flush_of_a_stopped_swtpm_is_one_line(tmp_path):
    with Swtpm(tmp_path / "tpm", free_port_pair()) as tpm:
        pass

    result = _run_cli("flush", "--state-dir", str(tpm.state_dir))

    assert result.returncode == 1
    _assert_one_line_naming(result, "no swtpm runs")


def test_cli_flush_of_a_tpm_that_does_not_answer_shows_no_tss_noise(swtpm):
    """The TSS libraries' own log lines stay off stderr without --debug."""
    swtpm.port_path.write_text(f"{free_port()}\n")

    result = _run_cli("flush", "--state-dir", str(swtpm.state_dir))

    assert result.returncode == 1
    _assert_one_line_naming(result, "swtpm on port")
    debug = _run_cli("--debug", "flush", "--state-dir", str(swtpm.state_dir))
    assert "tcti" in debug.stderr.lower()
    assert "Traceback" in debug.stderr


def _assert_one_line_naming(result, needle):
    stderr = result.stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: ")
    assert needle in stderr
    assert "internal error" not in stderr
    assert "Traceback" not in stderr


def _swtpm_pids(directory):
    """Pids of live swtpm processes whose command line names directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        is_swtpm = cmdline.split(b"\0")[0].endswith(b"swtpm")
        mentioned = str(directory).encode() in cmdline
        if is_swtpm and mentioned and _alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def test_cli_status_help_lists_every_exit_status():
    """Each status the command can end with is in --help, with its cause."""
    result = _run_cli("status", "--help")

    assert result.returncode == 0, result.stderr
    for line in (
        "0  swtpm runs and answers",
        "1  the state dir does not exist or cannot be read",
        "2  the command was used wrongly",
        "3  swtpm is not running, or does not answer",
    ):
        assert line in result.stdout, result.stdout
