"""Drive a device through ``device-agent`` processes, as a person would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509

from firmware_sim.ca import CertificateAuthority, chain_pem


class Device:
    """A device driven by ``device-agent`` processes, as a person would."""

    def __init__(
        self, tmp_path: Path, tcti: str | None, device_id: str = "dev-0042"
    ) -> None:
        self.dir = tmp_path / "device"
        self.config = self.dir / "agent.toml"
        self.state = self.dir / "state"
        self.tcti = tcti
        self.id = device_id

    def run(
        self,
        *args: str,
        check: bool = True,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
    ):
        result = subprocess.run(
            [sys.executable, "-m", "device_agent", "--config",
             str(self.config), *args],
            capture_output=True,
            input=stdin,
            env=dict(os.environ, **(env or {})),
            timeout=60,
            check=False,
        )  # fmt: skip
        result.out = result.stdout.decode()
        result.err = result.stderr.decode()
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed: {result.err}")
        return result

    def init(self, port: int, ca_file: Path, *extra: str):
        store = "tpm" if self.tcti else "software"
        args = [
            "init", "--device-id", self.id, "--serial", "SN42",
            "--key-store", store, "--state-dir", str(self.state),
            "--broker", f"127.0.0.1:{port}", "--ca-file", str(ca_file),
            *extra,
        ]  # fmt: skip
        if self.tcti:
            args += ["--tcti", self.tcti]
        return self.run(*args)

    def configure(self, **settings: object) -> None:
        """Append settings to the config file ``init`` wrote."""
        with self.config.open("a") as stream:
            for name, value in settings.items():
                shown = f'"{value}"' if isinstance(value, str) else value
                stream.write(f"{name} = {shown}\n")

    def start(self, *args: str, env: dict[str, str] | None = None):
        """``device-agent run`` in the background; stop it with stop()."""
        return subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--config",
             str(self.config), *args, "run"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})),
            text=True,
        )  # fmt: skip

    def csr(self) -> x509.CertificateSigningRequest:
        return x509.load_pem_x509_csr(self.run("csr").stdout)

    def enroll(self, ca: CertificateAuthority, **sign) -> Path:
        self.run("keygen")
        chain = ca.sign_csr(self.csr(), **sign)
        path = self.dir / "chain.pem"
        path.write_bytes(chain_pem(chain))
        self.run("install-chain", str(path))
        return path

    def snapshot(self, below: str = "") -> dict[str, bytes | str]:
        """Every file's bytes and every link's target under the state."""
        found: dict[str, bytes | str] = {}
        for root, dirs, files in os.walk(self.state / below):
            for name in dirs + files:
                path = Path(root, name)
                rel = str(path.relative_to(self.state))
                if path.is_symlink():
                    found[rel] = os.readlink(path)
                elif path.is_file():
                    found[rel] = path.read_bytes()
        return found


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it holds; fail naming ``what`` if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
