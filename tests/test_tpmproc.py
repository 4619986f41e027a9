"""The TPM key store served from a child process, against a real swtpm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from device_cli import wait_for

from device_agent import csr
from device_agent.errors import KeyStoreError, TPMError
from device_agent.keys import tpmproc
from device_agent.keys.tpm import TPMKeyStore


@pytest.fixture
def store(swtpm):
    yield tpmproc.ProcessTPMKeyStore(swtpm.tcti)
    tpmproc.close_all()


def child_pid(tcti: str) -> int | None:
    child = tpmproc._children.get(tcti)
    return None if child is None else child.process.pid


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie has)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_key_made_by_the_child_is_the_tpm_stores_own(store, swtpm, tmp_path):
    """Same blob format, same public key, usable by the in-process store."""
    path = tmp_path / "key.tss2.pem"
    public = store.generate(path)

    assert TPMKeyStore(swtpm.tcti).public_key(path) == public
    assert store.public_key(path) == public
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert swtpm.transient_handles() == []


def test_the_child_signs_a_csr_that_verifies_with_the_tpm_key(
    store, swtpm, tmp_path
):
    path = tmp_path / "key.tss2.pem"
    public = store.generate(path)

    with store.signer(path) as key:
        request = csr.build(key, "dev-7", "urn:dev:dev-7", "SN7")
        with pytest.raises(ValueError, match="cannot be exported"):
            key.private_numbers()

    assert request.is_signature_valid
    assert request.public_key() == public
    subject = request.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert subject[0].value == "dev-7"
    assert swtpm.transient_handles() == []


def test_a_signature_from_the_child_verifies(store, tmp_path):
    path = tmp_path / "key.tss2.pem"
    public = store.generate(path)

    with store.signer(path) as key:
        signature = key.sign(b"heartbeat", ec.ECDSA(hashes.SHA384()))
        with pytest.raises(ValueError, match="cannot sign with"):
            key.sign(b"x", ec.ECDSA(hashes.SHA1()))

    public.verify(signature, b"heartbeat", ec.ECDSA(hashes.SHA384()))


def test_a_file_that_is_no_tss2_key_is_a_key_store_error(store, tmp_path):
    path = tmp_path / "key.tss2.pem"
    path.write_bytes(b"-----BEGIN GARBAGE-----\n")
    path.chmod(0o600)

    with pytest.raises(KeyStoreError, match="not a TSS2 PRIVATE KEY"):
        store.public_key(path)
    # The child survives a refused request and serves the next one.
    assert store.answers()


def test_an_existing_key_file_is_never_overwritten(store, tmp_path):
    path = tmp_path / "key.tss2.pem"
    store.generate(path)
    before = path.read_bytes()

    with pytest.raises(KeyStoreError):
        store.generate(path)
    assert path.read_bytes() == before


def test_a_stopped_tpm_is_a_tpm_error_naming_the_step(store, swtpm, tmp_path):
    path = tmp_path / "key.tss2.pem"
    store.generate(path)
    swtpm.stop()

    assert not store.answers()
    with pytest.raises(TPMError, match=r"no TPM answers at"):
        store.check_loads(path)


def test_the_child_ends_when_idle_and_is_started_again(
    store, tmp_path, monkeypatch
):
    monkeypatch.setattr(tpmproc, "IDLE_SECONDS", 0.3)
    path = tmp_path / "key.tss2.pem"
    store.generate(path)
    first = child_pid(store.tcti)
    assert first is not None

    wait_for(lambda: gone(first), 10, "the idle child to end")
    assert child_pid(store.tcti) is None
    assert store.public_key(path) is not None
    assert child_pid(store.tcti) not in (None, first)


def test_a_killed_child_is_replaced(store, tmp_path):
    path = tmp_path / "key.tss2.pem"
    store.generate(path)
    first = child_pid(store.tcti)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not tpmproc._children[store.tcti].alive(), 10, "the kill")

    assert store.public_key(path) is not None
    assert child_pid(store.tcti) != first


def test_the_child_ends_when_its_parent_dies(swtpm, tmp_path):
    """A parent killed with SIGKILL leaves no helper behind."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from device_agent.keys import tpmproc\n"
        f"store = tpmproc.ProcessTPMKeyStore({swtpm.tcti!r})\n"
        f"store.generate(Path({str(tmp_path / 'k.tss2.pem')!r}))\n"
        "print(tpmproc._children[store.tcti].process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    helper = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    wait_for(lambda: gone(helper), 10, "the orphaned helper to end")
