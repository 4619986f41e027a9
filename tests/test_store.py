"""Credential lineage: generations, atomic pointers, lock and recovery."""

import os
import threading

import pytest

from device_agent.errors import StoreError
from device_agent.store import CredentialStore


def make(store, chain=b"chain"):
    generation = store.new_generation()
    (generation.path / "key.pkcs8.pem").write_bytes(b"key")
    if chain is not None:
        store.install(generation, chain)
    return generation


def test_generations_are_numbered_and_current_moves(tmp_path):
    store = CredentialStore(tmp_path)
    first = make(store, b"one")
    second = make(store, b"two")
    assert (first.number, second.number) == (1, 2)
    assert store.current() == second
    assert second.chain_path.read_bytes() == b"two"
    assert first.chain_path.read_bytes() == b"one"
    assert os.readlink(tmp_path / "idevid" / "current") == ("generations/0002")


def test_installing_pending_clears_it(tmp_path):
    store = CredentialStore(tmp_path)
    generation = make(store, chain=None)
    store.set_pending(generation)
    assert store.pending() == generation
    store.install(generation, b"chain")
    assert store.pending() is None
    assert store.current() == generation


def test_a_sealed_generation_is_never_rewritten(tmp_path):
    store = CredentialStore(tmp_path)
    generation = make(store)
    with pytest.raises(StoreError, match="sealed"):
        store.install(generation, b"other")
    assert generation.chain_path.read_bytes() == b"chain"


def test_files_and_directories_are_private(tmp_path):
    store = CredentialStore(tmp_path / "state")
    generation = make(store)
    for path in (tmp_path / "state", store.root, generation.path):
        assert path.stat().st_mode & 0o777 == 0o700


def test_recover_points_current_at_the_newest_complete(tmp_path):
    store = CredentialStore(tmp_path)
    first = make(store)
    second = make(store)
    (second.chain_path).unlink()  # as if the write never reached the disk
    orphan = make(store, chain=None)
    done = store.recover()
    assert store.current() == first
    assert not orphan.path.exists()
    assert not second.path.exists()
    assert done
    assert store.recover() == []  # a second pass finds nothing to do


def test_recover_keeps_a_pending_key(tmp_path):
    store = CredentialStore(tmp_path)
    make(store)
    pending = make(store, chain=None)
    store.set_pending(pending)
    store.recover()
    assert store.pending() == pending
    assert pending.path.exists()


def test_pointer_outside_the_store_is_refused(tmp_path):
    store = CredentialStore(tmp_path)
    make(store)
    link = store.root / "current"
    link.unlink()
    os.symlink("/etc", link)
    with pytest.raises(StoreError, match="outside"):
        store.current()


def test_lock_excludes_a_second_holder(tmp_path):
    store = CredentialStore(tmp_path)
    other = CredentialStore(tmp_path)
    entered = threading.Event()
    release = threading.Event()

    def hold():
        with store.lock():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(5)
    try:
        with (
            pytest.raises(StoreError, match="held by another"),
            other.lock(0.2),
        ):
            pass
    finally:
        release.set()
        thread.join()
    with other.lock(0.2):
        pass


def test_a_failed_atomic_write_leaves_no_temporary_and_names_the_file(
    tmp_path, monkeypatch
):
    import errno as errno_codes

    from device_agent.store import write_atomic

    target = tmp_path / "status.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno_codes.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(OSError) as failed:
        write_atomic(target, b"new", 0o600)

    assert failed.value.filename == str(target)
    assert failed.value.errno == errno_codes.ENOSPC
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
