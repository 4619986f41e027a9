"""Settings: file, environment and flags, and errors that name the field."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent import config
from device_agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_file_values_and_relative_paths(tmp_path):
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
