"""Every bad command line gets one line on stderr and a non-zero exit."""

import os
import subprocess
import sys

import pytest

from device_agent.cli.main import main


@pytest.fixture
def config(tmp_path, factory_ca):
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "d1"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        'key_store = "software"\n'
        f'ca_file = "{factory_ca.root_path}"\n'
        "broker_port = 1\n"
    )
    (tmp_path / "state").mkdir(mode=0o700)  # as init makes it
    return path


def run(capsys, *argv):
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, err):
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")


BAD = [
    ["no-such-verb"],
    ["--no-such-option", "status"],
    ["status", "--no-such-option"],
    ["install-chain"],
    ["install-chain", "/no/such/file.pem"],
    ["install-chain", "a", "b"],
    ["connect", "--count", "0"],
    ["connect", "--count", "many"],
    ["connect", "--timeout", "-1"],
    ["connect", "--publish", "only-topic"],
    ["connect", "--tls-max-version", "1.1"],
    ["--set", "nonsense", "status"],
    ["--set", "colour=blue", "status"],
    ["--set", "broker_port=99999", "status"],
    ["--set", "device_id=a b", "status"],
    ["--set", "key_store=hsm", "keygen"],
    ["--set", "tcti=bogus", "tpm", "info"],
    ["--set", "tcti=swtpm:host=127.0.0.1,port=1", "tpm", "info"],
    ["--set", "key_store=tpm", "--set", "tcti=device:/dev/nope", "keygen"],
    ["csr"],
    ["connect"],
    ["tpm"],
    ["tpm", "nope"],
    ["init"],
    ["init", "--device-id", "x"],
    [
        "init",
        "--device-id",
        "bad/id",
        "--broker",
        "h",
        "--ca-file",
        "/etc/hostname",
    ],
    [
        "init",
        "--device-id",
        "x",
        "--broker",
        "h:port",
        "--ca-file",
        "/etc/hostname",
    ],
    ["init", "--device-id", "x", "--broker", "h:1", "--ca-file", "/no/file"],
    [
        "init",
        "--device-id",
        "x",
        "--broker",
        "h:",
        "--ca-file",
        "/etc/hostname",
    ],
    [
        "init",
        "--device-id",
        "x",
        "--broker",
        "[::1]:",
        "--ca-file",
        "/etc/hostname",
    ],
    [
        "init",
        "--device-id",
        "x",
        "--broker",
        "h:1",
        "--ca-file",
        "/etc/hostname",
        "--key-store",
        "floppy",
    ],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_arguments(capsys, config, argv):
    code, _, err = run(capsys, "--config", str(config), *argv)
    assert_one_line(code, err)


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run(
        capsys, "--config", str(tmp_path / "none.toml"), "status"
    )
    assert_one_line(code, err)
    assert "no such file" in err


def test_broken_config_file(capsys, tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b"device_id = \xff\n")
    code, _, err = run(capsys, "--config", str(path), "status")
    assert_one_line(code, err)


def test_config_from_environment(capsys, monkeypatch, config):
    monkeypatch.setenv("DEVICE_AGENT_CONFIG", str(config))
    monkeypatch.setenv("DEVICE_AGENT_BROKER_PORT", "0")
    code, _, err = run(capsys, "status")
    assert_one_line(code, err)
    assert "broker_port" in err


def test_init_refuses_to_replace_a_config(capsys, config):
    before = config.read_bytes()
    code, _, err = run(
        capsys, "--config", str(config), "init", "--device-id", "x",
        "--broker", "h:1", "--ca-file", "/etc/hostname",
    )  # fmt: skip
    assert_one_line(code, err)
    assert config.read_bytes() == before


def test_csr_out_to_a_directory(capsys, config, tmp_path):
    assert run(capsys, "--config", str(config), "keygen")[0] == 0
    code, _, err = run(
        capsys, "--config", str(config), "csr", "--out", str(tmp_path)
    )
    assert_one_line(code, err)


def test_connect_to_nothing_says_unreachable(capsys, config):
    assert run(capsys, "--config", str(config), "keygen")[0] == 0
    code, _, err = run(capsys, "--config", str(config), "connect")
    assert_one_line(code, err)


def test_as_a_separate_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "device_agent", "--config",
         str(tmp_path / "x.toml"), "status"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_csr_out_never_replaces_special_files(capsys, config, tmp_path):
    assert run(capsys, "--config", str(config), "keygen")[0] == 0
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "real.csr"
    target.write_text("keep me")
    link = tmp_path / "link.csr"
    link.symlink_to(target)
    for out in (str(fifo), str(link), "/dev/null", ""):
        code, _, err = run(
            capsys, "--config", str(config), "csr", "--out", out
        )
        assert_one_line(code, err)
    assert fifo.is_fifo()
    assert link.is_symlink()
    assert target.read_text() == "keep me"


def test_install_chain_from_a_fifo_does_not_hang(capsys, config, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run(
        capsys, "--config", str(config), "install-chain", str(fifo)
    )
    assert_one_line(code, err)
    assert "not a regular file" in err


def test_shared_state_dir_is_refused_not_tightened(
    capsys, tmp_path, factory_ca
):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    code, _, err = run(
        capsys, "--config", str(tmp_path / "a.toml"), "init",
        "--device-id", "d", "--broker", "h", "--ca-file",
        str(factory_ca.root_path), "--state-dir", str(shared),
    )  # fmt: skip
    assert_one_line(code, err)
    assert "open to group or others" in err
    assert shared.stat().st_mode & 0o7777 == 0o1777
    assert not (tmp_path / "a.toml").exists()


def test_empty_state_dir_is_refused(capsys, tmp_path, factory_ca):
    code, _, err = run(
        capsys, "--config", str(tmp_path / "a.toml"), "init",
        "--device-id", "d", "--broker", "h", "--ca-file",
        str(factory_ca.root_path), "--state-dir", "",
    )  # fmt: skip
    assert_one_line(code, err)


@pytest.mark.parametrize(
    ("broker", "host", "port"),
    [
        ("h", "h", None),
        ("h:1884", "h", 1884),
        ("::1", "::1", None),
        ("[::1]:1884", "::1", 1884),
    ],
)
def test_broker_addresses(capsys, tmp_path, factory_ca, broker, host, port):
    path = tmp_path / "a.toml"
    code, _, err = run(
        capsys, "--config", str(path), "init", "--device-id", "d",
        "--broker", broker, "--ca-file", str(factory_ca.root_path),
        "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 0, err
    import tomllib

    written = tomllib.loads(path.read_text())
    assert written["broker_host"] == host
    assert written.get("broker_port") == port


@pytest.mark.parametrize(
    "argv",
    [
        ["connect", "--publish", "devices/d1/#", "x"],
        ["connect", "--publish", "", "x"],
        ["connect", "--subscribe", "a/#/b"],
        ["connect", "--subscribe", "a/b+"],
        ["connect", "--subscribe", ""],
        ["connect", "--subscribe", "x" * 70000],
    ],
)
def test_bad_topics_are_refused_before_connecting(capsys, config, argv):
    code, _, err = run(capsys, "--config", str(config), *argv)
    assert_one_line(code, err)
    assert "invalid topic" in err


def test_ctrl_c_while_the_command_loads_is_one_line(monkeypatch, capsys):
    """A Ctrl-C that lands before the error edge exists ends in one line."""
    import importlib

    from device_agent import cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as stopped:
        cli.device_agent()

    assert stopped.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"
