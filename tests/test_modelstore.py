"""The model store: content-addressed files, the atomic pointer, fallback, garbage."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.rollout.store import ActiveModel, ModelStore


def test_model_store_falls_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.active() is None  # empty: the factory model runs
    data = b"model-bytes-1"
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    store.put(data, sha)
    store.activate(ActiveModel(sha256=sha, name="m", version=1))
    assert store.active() is not None
    store.path_for(sha).write_bytes(b"tampered")  # damaged on disk
    assert store.active() is None
    store.pointer.write_text("{not json")
    assert store.active() is None
    with pytest.raises(ValueError, match="does not match"):
        store.put(b"other", sha)


def _put(store: ModelStore, data: bytes) -> str:
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    store.put(data, sha)
    return sha


def test_a_damaged_active_model_falls_back_to_the_previous(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "not" / "yet")  # folders made on the first put
    first, second = _put(store, b"one"), _put(store, b"two")
    assert _put(store, b"two") == second  # putting the same model again is fine
    store.activate(ActiveModel(sha256=first, name="a", version=1))
    store.activate(
        ActiveModel(
            sha256=second,
            name="b",
            version=2,
            previous=ActiveModel(sha256=first, name="a", version=1),
        )
    )
    active = store.active()
    assert active is not None
    assert (active.name, active.version) == ("b", 2)
    store.path_for(second).write_bytes(b"flipped")
    back = store.active()
    assert back is not None
    assert (back.sha256, back.name) == (first, "a")
    store.path_for(first).unlink()  # the previous one gone as well: the factory model
    assert store.active() is None


def test_a_missing_model_file_is_not_valid(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    sha = _put(store, b"one")
    store.activate(ActiveModel(sha256=sha, name="a", version=1))
    store.path_for(sha).unlink()
    assert store.active() is None


def test_activate_makes_its_folder_and_keeps_one_step_of_history(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    grand = ActiveModel(sha256="0" * 64, name="g", version=1)
    parent = ActiveModel(sha256="1" * 64, name="p", version=2, previous=grand)
    store.activate(ActiveModel(sha256="2" * 64, name="c", version=3, previous=parent))
    record = ActiveModel.model_validate_json(store.pointer.read_bytes())
    assert record.previous is not None
    assert record.previous.name == "p"
    assert record.previous.previous is None  # no chain: one step back is enough


def test_gc_keeps_the_active_and_the_previous_only(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    old, previous, active = _put(store, b"old"), _put(store, b"prev"), _put(store, b"act")
    assert sorted(p.name for p in store.gc()) == sorted(
        f"{sha}.tflite" for sha in (old, previous, active)
    )  # nothing active: nothing to keep
    old, previous, active = _put(store, b"old"), _put(store, b"prev"), _put(store, b"act")
    store.activate(
        ActiveModel(
            sha256=active,
            name="a",
            version=3,
            previous=ActiveModel(sha256=previous, name="p", version=2),
        )
    )
    removed = store.gc()
    assert [p.name for p in removed] == [f"{old}.tflite"]
    assert not store.path_for(old).exists()
    assert store.path_for(previous).exists()
    assert store.path_for(active).exists()
    assert store.gc() == []


def test_activate_into_a_state_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    store.activate(ActiveModel(sha256="0" * 64, name="n", version=1))
    assert store.pointer.exists()


def test_no_record_is_never_valid(tmp_path: Path) -> None:
    assert ModelStore(tmp_path)._valid(None) is False


def test_a_verified_model_is_hashed_again_once_written_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store remembers a file it hashed by its stat: asked again, it does not read it;
    written since (even in place, same size), it hashes it again and finds the damage."""
    import os
    import time

    store = ModelStore(tmp_path)
    sha = _put(store, b"model-bytes")
    store.activate(ActiveModel(sha256=sha, name="m", version=1))
    assert store.active() is not None
    reads: list[Path] = []
    read_bytes = Path.read_bytes

    def counting(path: Path) -> bytes:
        reads.append(path)
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", counting)
    assert store.active() is not None
    assert store.path_for(sha) not in reads  # the pointer is read, the model is not
    time.sleep(0.05)  # past the file system's timestamp granularity (a few ms)
    fd = os.open(store.path_for(sha), os.O_WRONLY)
    os.pwrite(fd, b"X", 3)
    os.close(fd)
    assert store.active() is None
