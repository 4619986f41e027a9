"""Settings: file, environment and flags, and errors that name the field."""

import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_renewal import one_line_error

from device_agent import config
from device_agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_file_values_and_relative_paths(tmp_path):
    (tmp_path / "ca.pem").write_text("a CA bundle\n")
    path = write(
        tmp_path,
        'device_id = "dev-1"\nstate_dir = "state"\nca_file = "ca.pem"\n'
        "broker_port = 8884\n",
    )
    settings = config.load(path, environ={})
    assert settings.device_id == "dev-1"
    assert settings.state_dir == tmp_path / "state"
    assert settings.ca_file == tmp_path / "ca.pem"
    assert settings.broker_port == 8884
    assert settings.anchor_file == tmp_path / "ca.pem"


def test_environment_then_overrides_win(tmp_path):
    path = write(tmp_path, 'device_id = "a"\nstate_dir = "/s"\n')
    env = {"DEVICE_AGENT_DEVICE_ID": "b", "DEVICE_AGENT_BROKER_PORT": "99"}
    settings = config.load(path, {"device_id": "c"}, environ=env)
    assert settings.device_id == "c"
    assert settings.broker_port == 99


@pytest.mark.parametrize(
    "name",
    ["DEVICE_AGENT_HEARTBEAT_INTERVL", "DEVICE_AGENT_", "DEVICE_AGENT_X"],
)
def test_a_misspelt_environment_override_is_refused_by_name(tmp_path, name):
    path = write(tmp_path, 'device_id = "a"\nstate_dir = "/s"\n')
    with pytest.raises(ConfigError, match="unknown setting") as caught:
        config.load(path, environ={name: "5"})
    assert caught.value.field == name


@pytest.mark.parametrize(
    ("tcti", "problem"),
    [
        ("swtpm:host=127.0.0.1,port=99999", "port must be a number between"),
        ("swtpm:port=0", "port must be a number between"),
        ("mssim:host=127.0.0.1,foo=bar", "'foo=bar' is not host=HOST"),
        ("swtpm:host=", "'host=' is not host=HOST"),
        ("swtpm:port=abc", "port must be a number"),
        ("swtpm:port=2321,port=1", "port= is given twice"),
        ("device:dev/tpmrm0", "absolute path"),
        ("tpm0", "must be a TCTI"),
    ],
)
def test_a_malformed_tcti_is_refused_at_load(tmp_path, tcti, problem):
    path = write(tmp_path, 'device_id = "a"\nstate_dir = "/s"\n')
    with pytest.raises(ConfigError, match=problem) as caught:
        config.load(path, {"tcti": tcti}, environ={})
    assert caught.value.field == "tcti"


@pytest.mark.parametrize(
    "tcti",
    [
        "device:/dev/tpmrm0",
        "swtpm:host=127.0.0.1,port=2321",
        "swtpm",
        "mssim:host=localhost,port=2321",
        "tabrmd:bus_name=com.intel.tss2.Tabrmd",
    ],
)
def test_usual_tctis_are_accepted(tmp_path, tcti):
    path = write(tmp_path, 'device_id = "a"\nstate_dir = "/s"\n')
    assert config.load(path, {"tcti": tcti}, environ={}).tcti == tcti


@pytest.mark.parametrize("field", ["broker_host", "server_name"])
def test_a_host_with_a_port_is_refused_naming_broker_port(tmp_path, field):
    path = write(tmp_path, 'device_id = "a"\nstate_dir = "/s"\n')
    with pytest.raises(ConfigError, match="without ':PORT'") as caught:
        config.load(path, {field: "127.0.0.1:28883"}, environ={})
    assert caught.value.field == field
    ipv6 = config.load(path, {field: "fd00::1"}, environ={})
    assert getattr(ipv6, field) == "fd00::1"


def test_the_config_and_test_variables_are_not_settings(tmp_path):
    path = write(tmp_path, 'device_id = "a"\nstate_dir = "/s"\n')
    env = {
        "DEVICE_AGENT_CONFIG": str(path),
        "DEVICE_AGENT_TEST_KILL_AT": "csr",
        "DEVICE_AGENT_HEARTBEAT_INTERVAL": "5",
    }
    assert config.load(path, environ=env).heartbeat_interval == 5


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('device_id = "a"\nstate_dir = "/s"\ncolour = 1\n', "colour"),
        ('state_dir = "/s"\n', "device_id"),
        ('device_id = "a/b"\nstate_dir = "/s"\n', "device_id"),
        (
            'device_id = "a"\nstate_dir = "/s"\nbroker_port = "x"\n',
            "broker_port",
        ),
        (
            'device_id = "a"\nstate_dir = "/s"\nbroker_port = 70000\n',
            "broker_port",
        ),
        (
            'device_id = "a"\nstate_dir = "/s"\nkey_store = "hsm"\n',
            "key_store",
        ),
        ('device_id = "a"\nstate_dir = "/s"\ntcti = "nope"\n', "tcti"),
        ('device_id = "a"\nstate_dir = 5\n', "state_dir"),
        ('device_id = "a"\nstate_dir = "/s"\nkeepalive = true\n', "keepalive"),
        (
            'device_id = "a"\nstate_dir = "/s"\nmqtt_version = 4\n',
            "mqtt_version",
        ),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text), environ={})
    assert info.value.field == field
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "device_id = \n"), environ={})
    with pytest.raises(ConfigError, match="not a regular file"):
        config.load(tmp_path, environ={})


@given(
    device_id=st.from_regex(
        r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True
    ),
    ca=st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s),
    port=st.integers(1, 65535),
)
def test_written_config_reads_back(device_id, ca, port):
    values = {
        "device_id": device_id,
        "state_dir": "/var/lib/x",
        "ca_file": "/" + ca,
        "broker_port": port,
    }
    text = config.to_toml(values)
    import tomllib

    assert tomllib.loads(text) == values


@given(st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4))
def test_any_environment_gives_settings_or_config_error(env):
    environ = {f"DEVICE_AGENT_{k.upper()}": v for k, v in env.items()}
    base = {"device_id": "d", "state_dir": "/s"}
    try:
        config.build(base, config.from_environment(environ))
    except ConfigError as exc:
        assert exc.field


BASE = 'device_id = "a"\nstate_dir = "/s"\n'


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("broker_port", "-5", "must be between 1 and 65535"),
        ("broker_port", "+70000", "must be between 1 and 65535"),
        ("offline_queue", "0", "must be between 1 and 1000000"),
        ("keepalive", "\u0661\u0660\u0660", "must be a whole number"),
        ("connect_timeout", "\u0661\u0660", "must be seconds"),
        ("connect_timeout", "1_0", "must be seconds"),
    ],
)
def test_numbers_as_text_take_ascii_digits_and_name_the_range(
    tmp_path, field, value, problem
):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, BASE), {field: value}, environ={})
    assert info.value.field == field
    assert info.value.problem == problem


def test_numbers_as_text_still_read(tmp_path):
    settings = config.load(
        write(tmp_path, BASE),
        {"broker_port": " 8884 ", "connect_timeout": "2.5e1"},
        environ={},
    )
    assert settings.broker_port == 8884
    assert settings.connect_timeout == 25.0


def test_a_state_dir_that_is_a_file_is_named_as_such(tmp_path):
    not_a_dir = tmp_path / "passwd"
    not_a_dir.write_text("root:x:0:0::/root:/bin/sh\n")
    with pytest.raises(ConfigError) as info:
        config.load(
            write(tmp_path, BASE), {"state_dir": str(not_a_dir)}, environ={}
        )
    assert info.value.field == "state_dir"
    assert info.value.problem == f"{not_a_dir}: not a directory"


@pytest.mark.parametrize("field", ["ca_file", "trust_anchor"])
def test_ca_files_must_be_small_regular_files_checked_at_load(tmp_path, field):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (config.MAX_FILE_BYTES + 1))
    cases = [
        ("/dev/zero", "/dev/zero: not a regular file"),
        (str(fifo), f"{fifo}: not a regular file"),
        (str(tmp_path), f"{tmp_path}: is a directory"),
        (str(tmp_path / "gone.pem"), f"{tmp_path / 'gone.pem'}: no such file"),
        (str(big), "over the 1048576 allowed"),
    ]
    path = write(tmp_path, BASE)
    for value, problem in cases:
        started = time.monotonic()
        with pytest.raises(ConfigError) as info:
            config.load(path, {field: value}, environ={})
        assert time.monotonic() - started < 1
        assert info.value.field == field
        assert info.value.problem.endswith(problem)


def test_load_anchors_never_blocks_on_a_fifo(tmp_path):
    from device_agent import chain
    from device_agent.errors import ChainError

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ChainError, match="not a regular file"):
        chain.load_anchors(fifo)


def test_tls_refuses_a_ca_file_replaced_by_a_fifo(tmp_path):
    from device_agent import tls

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        tls.client_context(fifo, tmp_path / "chain.pem", tmp_path / "k")


HOOK = 'renewal_hook = "/usr/local/bin/reload"\n'


@pytest.mark.parametrize(
    ("text", "mode", "who"),
    [
        (BASE, 0o666, "everyone"),
        (BASE, 0o602, "everyone"),
        (BASE + HOOK, 0o664, "its group and sets renewal_hook"),
    ],
)
def test_a_config_file_others_may_write_is_refused(tmp_path, text, mode, who):
    path = write(tmp_path, text)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert info.value.field == str(path)
    assert f"is writable by {who} (mode {mode:04o})" in info.value.problem
    assert "chmod " in info.value.problem and str(path) in info.value.problem


def test_a_group_writable_config_without_a_hook_is_accepted(tmp_path):
    path = write(tmp_path, BASE)
    path.chmod(0o664)
    assert config.load(path, environ={}).device_id == "a"


@pytest.fixture
def device(software_device):
    return software_device


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_install_chain_with_a_special_trust_anchor_is_one_line(
    device, special
):
    if special == "fifo":
        special = str(device.dir / "fifo")
        os.mkfifo(special)
    chain = device.dir / "chain.pem"
    before = device.snapshot()
    result = device.run(
        "--set", f"trust_anchor={special}", "install-chain", str(chain),
        check=False,
    )  # fmt: skip
    line = one_line_error(result)
    assert line.endswith(f"trust_anchor: {special}: not a regular file")
    assert device.snapshot() == before


def test_a_missing_trust_anchor_is_reported_by_any_command(device):
    gone = device.dir / "gone.pem"
    result = device.run("--set", f"trust_anchor={gone}", "status", check=False)
    assert one_line_error(result).endswith(
        f"trust_anchor: {gone}: no such file"
    )


def test_tables_nested_too_deep_are_one_error_naming_the_file(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 100_000)
    with pytest.raises(ConfigError, match="nested too deep") as caught:
        config.load(path, environ={})
    assert str(path) in str(caught.value)
