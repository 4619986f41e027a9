"""Agent settings: a TOML file, then DEVICE_AGENT_* variables, then flags."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/device-agent/agent.toml")
CONFIG_ENV = "DEVICE_AGENT_CONFIG"
ENV_PREFIX = "DEVICE_AGENT_"
# Variables the test campaigns set to steer the agent, never settings.
TEST_ENV_PREFIX = "DEVICE_AGENT_TEST_"

KEY_STORES = ("tpm", "software", "auto")
TLS_VERSIONS = ("1.2", "1.3")
MQTT_VERSIONS = ("5", "3.1.1")

# A device id is a certificate CN and an MQTT topic level, so it must not
# hold topic wildcards, separators or anything a shell would trip over.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SERIAL = re.compile(r"[\x21-\x7e]{1,64}")
_TCTI = re.compile(r"(swtpm|mssim|device|tabrmd|libtpms)(:.*)?")
# Numbers given as text take ASCII digits only: int() and float() also
# read other scripts' digits, which no one means in a config.
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DECIMAL = re.compile(
    r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII
)

# CA files are a few KiB; anything larger, or anything that is not a
# regular file (a FIFO, /dev/zero), would hang or exhaust the agent.
MAX_FILE_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the agent needs to know about its device and broker."""

    device_id: str
    state_dir: Path
    serial: str | None = None
    key_store: str = "auto"
    tcti: str = "device:/dev/tpmrm0"
    broker_host: str = "127.0.0.1"
    broker_port: int = 8883
    ca_file: Path | None = None
    trust_anchor: Path | None = None
    server_name: str | None = None
    tls_min_version: str = "1.2"
    mqtt_version: str = "5"
    keepalive: int = 60
    connect_timeout: float = 10.0
    openssl_modules: Path | None = None
    heartbeat_interval: float = 60.0
    offline_queue: int = 1000
    renew_fraction: float = 2 / 3
    renew_jitter: float = 0.05
    renew_floor: float = 60.0
    retry_base: float = 10.0
    retry_cap: float = 3600.0
    clock_skew: float = 300.0
    enroll_timeout: float = 30.0
    renewal_hook: str | None = None

    @property
    def client_id(self) -> str:
        return self.device_id

    @property
    def anchor_file(self) -> Path | None:
        """The CA bundle our own chain must build to."""
        return self.trust_anchor or self.ca_file

    @property
    def heartbeat_topic(self) -> str:
        return f"devices/{self.device_id}/heartbeat"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def device_uri(self) -> str:
        return f"urn:device-agent:{self.device_id}"

    def require(self, name: str) -> Any:
        """Return a setting a command cannot do without, or say it is unset."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(name, "is not set")
        return value


def _text(pattern: re.Pattern[str] | None, what: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if pattern is not None and not pattern.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return convert


def _tcti(value: Any) -> str:
    """A TCTI string, with the options of the simulators' TCTIs checked.

    tpm2-tss reports a bad option only as a TPM that does not answer;
    refusing it here names what is wrong instead.
    """
    text = _text(_TCTI, "a TCTI such as swtpm:host=H,port=P or device:PATH")(
        value
    )
    name, _, options = text.partition(":")
    if name == "device" and options and not options.startswith("/"):
        raise ValueError("device: takes an absolute path, e.g. /dev/tpmrm0")
    if name not in ("swtpm", "mssim") or not options:
        return text
    seen: set[str] = set()
    for option in options.split(","):
        key, equals, given = option.partition("=")
        if key not in ("host", "port") or not equals or not given:
            raise ValueError(f"{option!r} is not host=HOST or port=PORT")
        if key in seen:
            raise ValueError(f"{key}= is given twice")
        seen.add(key)
        if key == "port" and not (
            _INTEGER.fullmatch(given) and 1 <= int(given) <= 65535
        ):
            raise ValueError("port must be a number between 1 and 65535")
    return text


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value) if isinstance(value, int | float) else value
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return str(text)

    return convert


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


def _number(low: float, high: float, what: str) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, str):
            if not _DECIMAL.fullmatch(value.strip()):
                raise ValueError(f"must be {what}")
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be {what}")
        if not low <= value <= high:
            raise ValueError(f"must be {what} from {low:g} to {high:g}")
        return float(value)

    return convert


def _command(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a command line")
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"is not a valid command line: {exc}") from None
    return value


def _path(value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("must be a path")
    if "\0" in str(value):
        raise ValueError("must not contain a NUL byte")
    return Path(value).expanduser()


def _host(value: Any) -> str:
    # International names are given in their ASCII (punycode) form.
    if not isinstance(value, str) or not 0 < len(value) <= 253:
        raise ValueError("must be a host name or IP address")
    if not all("!" <= c <= "~" and c not in "/@[]" for c in value):
        raise ValueError("must be a host name or IP address in ASCII")
    if value.count(":") == 1:  # an IPv6 address holds two or more
        raise ValueError(
            "must be a host name or IP address without ':PORT' "
            "(the port is broker_port)"
        )
    return value


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "device_id": _text(DEVICE_ID, "1-64 letters, digits, '.', '_' or '-'"),
    "state_dir": _path,
    "serial": _text(SERIAL, "1-64 printable characters without spaces"),
    "key_store": _choice(KEY_STORES),
    "tcti": _tcti,
    "broker_host": _host,
    "broker_port": _integer(1, 65535),
    "ca_file": _path,
    "trust_anchor": _path,
    "server_name": _host,
    "tls_min_version": _choice(TLS_VERSIONS),
    "mqtt_version": _choice(MQTT_VERSIONS),
    "keepalive": _integer(5, 65535),
    "connect_timeout": _number(0.1, 3600, "seconds"),
    "openssl_modules": _path,
    "heartbeat_interval": _number(0.1, 86400, "seconds"),
    # A message takes a place in the queue until its PUBACK, online too.
    "offline_queue": _integer(1, 1_000_000),
    "renew_fraction": _number(0.1, 0.95, "a fraction of the lifetime"),
    "renew_jitter": _number(0, 0.5, "a fraction of the lifetime"),
    "renew_floor": _number(0, 365 * 86400, "seconds"),
    "retry_base": _number(0.1, 86400, "seconds"),
    "retry_cap": _number(0.1, 7 * 86400, "seconds"),
    "clock_skew": _number(0, 86400, "seconds"),
    "enroll_timeout": _number(1, 3600, "seconds"),
    "renewal_hook": _command,
}

_PATH_FIELDS = ("state_dir", "ca_file", "trust_anchor", "openssl_modules")
_FILE_FIELDS = ("ca_file", "trust_anchor")
_REQUIRED = ("device_id", "state_dir")


def read_file(path: Path) -> dict[str, Any]:
    """Parse a TOML config file into raw values; paths relative to it."""
    info = _stat(path)
    if info is not None and str(path) != "/dev/null":
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(str(path), "is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(
                str(path), f"is larger than {MAX_FILE_BYTES} bytes"
            )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "is a directory") from None
    except OSError as exc:
        raise ConfigError(str(path), exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(
            str(path), "not valid TOML: arrays or tables nested too deep"
        ) from None
    if info is not None and stat.S_ISREG(info.st_mode):
        _check_writers(path, info, "renewal_hook" in raw)

    for name in _PATH_FIELDS:
        value = raw.get(name)
        if isinstance(value, str) and value and not value.startswith("~"):
            raw[name] = str(path.parent / value)
    return raw


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None  # reading it says why


def _check_writers(path: Path, info: os.stat_result, has_hook: bool) -> None:
    """Refuse a config file others could change.

    Whoever can write the file can point the agent at another broker
    and CA, and through renewal_hook run any command as the agent's
    user, often root: group write is refused when the file sets one.
    """
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IWOTH:
        who, fix = "everyone", "o-w"
    elif mode & stat.S_IWGRP and has_hook:
        who, fix = "its group and sets renewal_hook", "g-w,o-w"
    else:
        return
    raise ConfigError(
        str(path),
        f"is writable by {who} (mode {mode:04o}); "
        f"run: chmod {fix} {shlex.quote(str(path))}",
    )


def check_file(path: Path) -> None:
    """Refuse what is not a regular file of at most MAX_FILE_BYTES.

    Only stat() is used, so a FIFO is never opened (opening one blocks
    until someone writes to it).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path}: is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise ValueError(
            f"{path}: {info.st_size} bytes, over the {MAX_FILE_BYTES} allowed"
        )


def _check_paths(settings: Settings) -> None:
    for name in _FILE_FIELDS:
        path = getattr(settings, name)
        if path is not None:
            try:
                check_file(path)
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
    state_dir = _stat(settings.state_dir)
    if state_dir is not None and not stat.S_ISDIR(state_dir.st_mode):
        raise ConfigError(
            "state_dir", f"{settings.state_dir}: not a directory"
        )


def from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Pick DEVICE_AGENT_<FIELD> variables out of an environment.

    Any other variable of that prefix is refused, as an unknown key in
    the file is: a misspelt override must not be ignored in silence.
    """
    names = {ENV_PREFIX + name.upper(): name for name in _CONVERTERS}
    values = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_ENV:
            continue
        if key.startswith(TEST_ENV_PREFIX):
            continue
        if key not in names:
            raise ConfigError(key, "unknown setting in the environment")
        values[names[key]] = value
    return values


def build(*layers: Mapping[str, Any]) -> Settings:
    """Merge layers (later ones win) into checked settings.

    A value of ``None`` in a layer means "not given here".
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.items():
            if name not in _CONVERTERS:
                raise ConfigError(name, "unknown setting")
            if value is not None:
                merged[name] = value

    settings: dict[str, Any] = {}
    for name, value in merged.items():
        try:
            settings[name] = _CONVERTERS[name](value)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None

    for name in _REQUIRED:
        if name not in settings:
            raise ConfigError(name, "is required")
    made = Settings(**settings)
    if made.retry_cap < made.retry_base:
        raise ConfigError("retry_cap", "must not be below retry_base")
    _check_paths(made)
    return made


def config_path(flag: Path | None, environ: Mapping[str, str]) -> Path:
    """The config file named by the flag, the environment, or the default."""
    if flag is not None:
        return flag
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load(
    path: Path,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the file at ``path``, then the environment, then ``overrides``."""
    env = os.environ if environ is None else environ
    return build(read_file(path), from_environment(env), overrides or {})


def to_toml(values: Mapping[str, Any]) -> str:
    """Write settings as TOML, in the field order of ``Settings``."""
    lines = ["# device-agent configuration", ""]
    for field in dataclasses.fields(Settings):
        value = values.get(field.name)
        if value is None:
            continue
        if isinstance(value, bool):
            raise ConfigError(field.name, "must not be a boolean")
        if isinstance(value, int | float):
            lines.append(f"{field.name} = {value}")
        else:
            lines.append(f"{field.name} = {_toml_string(str(value))}")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes; TOML
    # also forbids a raw DEL, which JSON leaves alone.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
