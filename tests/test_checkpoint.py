"""Checkpoints: atomic writes under failure, latest/rotation by step, weights_only loading."""
from __future__ import annotations

import os
import pickle
import random

import pytest
import torch

import fastmoco.weights.checkpoint as ckpt


def state(step):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "weights": {"w": torch.randn(4, 3, generator=g)}, "lr": 0.1 * step}


def files(run_dir):
    return sorted(p.name for p in ckpt.checkpoint_dir(run_dir).iterdir())


def assert_state_equal(got, want):
    assert got["step"] == want["step"] and got["lr"] == want["lr"]
    assert torch.equal(got["weights"]["w"], want["weights"]["w"])


def failing_save(exc):
    """A torch.save that writes part of a file, then raises."""
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise exc
    return save


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, exc):
    old = ckpt.save_checkpoint(tmp_path, 10, state(10))
    old_bytes = old.read_bytes()
    monkeypatch.setattr(torch, "save", failing_save(exc))
    with pytest.raises(type(exc)):
        ckpt.save_checkpoint(tmp_path, 20, state(20))
    monkeypatch.undo()
    assert files(tmp_path) == ["checkpoint_000000010.pt"]  # no temp file, no half checkpoint
    assert ckpt.latest_checkpoint(tmp_path) == old
    assert old.read_bytes() == old_bytes
    assert_state_equal(ckpt.load_checkpoint(old), state(10))


def test_failed_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = ckpt.save_checkpoint(tmp_path, 10, state(10))

    def fail(src, dst):
        raise OSError("rename failed")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        ckpt.save_checkpoint(tmp_path, 20, state(20))
    monkeypatch.undo()
    assert files(tmp_path) == ["checkpoint_000000010.pt"]
    assert ckpt.latest_checkpoint(tmp_path) == old
    assert_state_equal(ckpt.load_checkpoint(old), state(10))


def test_file_being_written_is_not_latest(tmp_path, monkeypatch):
    """Mid-write (a crash now would leave this), the old checkpoint is still the latest."""
    old = ckpt.save_checkpoint(tmp_path, 10, state(10))
    real_save, seen = torch.save, []

    def slow_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half")
        f.flush()
        seen.append(ckpt.latest_checkpoint(tmp_path))
        f.seek(0)
        f.truncate()
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", slow_save)
    new = ckpt.save_checkpoint(tmp_path, 20, state(20))
    monkeypatch.undo()
    assert seen == [old]
    assert ckpt.latest_checkpoint(tmp_path) == new
    assert_state_equal(ckpt.load_checkpoint(new), state(20))


def test_failed_overwrite_leaves_old_content(tmp_path, monkeypatch):
    """save_atomic over an existing file: a failure mid-write leaves the old file whole."""
    path = tmp_path / "sub" / "model.pt"
    ckpt.save_atomic(state(1), path)
    monkeypatch.setattr(torch, "save", failing_save(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        ckpt.save_atomic(state(2), path)
    monkeypatch.undo()
    assert os.listdir(path.parent) == ["model.pt"]
    assert_state_equal(ckpt.load_checkpoint(path), state(1))
    ckpt.save_atomic(state(2), path)  # and a later write succeeds
    assert_state_equal(ckpt.load_checkpoint(path), state(2))


def test_stray_temp_files_are_never_latest(tmp_path):
    """Leftovers of a killed writer (temp names) do not count as checkpoints."""
    ckpt.save_checkpoint(tmp_path, 5, state(5))
    d = ckpt.checkpoint_dir(tmp_path)
    (d / ".checkpoint_000000009.pt.abc123.tmp").write_bytes(b"partial")
    (d / "checkpoint_000000009.pt.tmp").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == d / "checkpoint_000000005.pt"


def test_latest_is_by_step_not_by_write_order(tmp_path):
    for step in (100, 9, 10):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep=10)
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_000000100.pt"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint_000000009.pt", "checkpoint_000000010.pt", "checkpoint_000000100.pt"]


def test_no_checkpoint(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_rotation_keeps_newest(tmp_path, keep):
    steps = [1, 2, 5, 10, 20]
    for step in steps:
        path = ckpt.save_checkpoint(tmp_path, step, state(step), keep=keep)
        assert path.exists()
    assert files(tmp_path) == [f"checkpoint_{s:09d}.pt" for s in steps[-keep:]]
    assert_state_equal(ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)), state(20))


def test_rotation_leaves_other_files(tmp_path):
    d = ckpt.checkpoint_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep=1)
    assert files(tmp_path) == ["checkpoint_000000003.pt", "notes.txt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_checkpoint(path)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    path = ckpt.save_checkpoint(tmp_path, 1, {"rng": ckpt.rng_state()})
    want = ([random.random() for _ in range(3)], torch.rand(3))
    random.seed(2)
    torch.manual_seed(2)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
    got = ([random.random() for _ in range(3)], torch.rand(3))
    assert got[0] == want[0] and torch.equal(got[1], want[1])


def run_state(step):
    """A checkpoint as training writes it, as far as read_newest looks: it holds the progress."""
    return {**state(step), "progress": {"step": step}}


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path):
    path.write_bytes(b"")


def flip_a_weight_bit(path):
    """Bit rot inside the tensor data: torch.load alone would load the wrong weights."""
    data = bytearray(path.read_bytes())
    w = state(20)["weights"]["w"].numpy().tobytes()
    at = bytes(data).index(w)
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


def not_a_zip(path):
    path.write_bytes(b"this is not a checkpoint" * 100)


@pytest.mark.parametrize("damage", [truncate, empty, flip_a_weight_bit, not_a_zip])
def test_unreadable_newest_falls_back_to_the_one_before(tmp_path, caplog, damage):
    ckpt.save_checkpoint(tmp_path, 10, run_state(10))
    newest = ckpt.save_checkpoint(tmp_path, 20, run_state(20))
    damage(newest)
    with caplog.at_level("WARNING"):
        path, got = ckpt.read_newest(tmp_path)
    assert path.name == "checkpoint_000000010.pt"
    assert_state_equal(got, run_state(10))
    assert "checkpoint_000000020.pt cannot be read" in caplog.text


def test_bit_rot_in_the_weights_is_caught_by_the_crc(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 20, run_state(20))
    flip_a_weight_bit(path)
    loaded = ckpt.load_checkpoint(path)  # torch.load checks no CRC: wrong weights, no error
    assert not torch.equal(loaded["weights"]["w"], state(20)["weights"]["w"])
    with pytest.raises(ValueError, match="CRC-32"):
        ckpt.verify_checkpoint(path)


def test_readable_newest_is_used(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, run_state(10))
    ckpt.save_checkpoint(tmp_path, 20, run_state(20))
    path, got = ckpt.read_newest(tmp_path)
    assert path.name == "checkpoint_000000020.pt"
    assert_state_equal(got, run_state(20))
    assert ckpt.read_newest(tmp_path / "elsewhere") == (None, None)


def test_no_readable_checkpoint_names_them_all(tmp_path):
    for step in (10, 20):
        truncate(ckpt.save_checkpoint(tmp_path, step, run_state(step)))
    with pytest.raises(RuntimeError, match=r"checkpoint_000000020.pt \(.*checkpoint_000000010.pt "
                                           r"\(.*another run.dir"):
        ckpt.read_newest(tmp_path)


def test_rename_is_between_fsync_of_the_file_and_of_the_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the synced files")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = ckpt.save_checkpoint(tmp_path, 10, state(10))
    (_, synced_file), (_, tmp, dst), (_, synced_dir) = events
    assert synced_file == tmp and os.path.dirname(tmp) == str(path.parent)
    assert dst == str(path)
    assert synced_dir == str(path.parent.resolve())


def test_check_writable_removes_leftovers_and_names_a_read_only_folder(tmp_path, monkeypatch):
    import errno
    import tempfile

    d = ckpt.checkpoint_dir(tmp_path)
    d.mkdir(parents=True)
    (d / ".checkpoint_000000009.pt.abc123.tmp").write_bytes(b"partial")
    ckpt.check_writable(tmp_path)
    assert os.listdir(d) == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(d))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match="Read-only"):
        ckpt.check_writable(tmp_path)
    from fastmoco.config import RunConfig
    from fastmoco.training.state import check_run_dir

    with pytest.raises(PermissionError, match=f"run.dir={tmp_path} is not writable.*Read-only"):
        check_run_dir(RunConfig(dir=str(tmp_path)), 0, torch.device("cpu"))


def test_unreadable_newer_ones_are_set_aside_and_do_not_push_out_readable_ones(tmp_path, caplog):
    """Resumed from step 10 past an unreadable step 20: without setting it aside, the save at
    step 15 would keep 15 and the unreadable 20 and delete 10, leaving one readable checkpoint."""
    ckpt.save_checkpoint(tmp_path, 10, run_state(10))
    truncate(ckpt.save_checkpoint(tmp_path, 20, run_state(20)))
    with caplog.at_level("WARNING"):
        path, _ = ckpt.read_newest(tmp_path, set_aside=True)
    assert path.name == "checkpoint_000000010.pt"
    assert "checkpoint_000000020.pt set aside as checkpoint_000000020.pt.unreadable" in caplog.text
    ckpt.save_checkpoint(tmp_path, 15, run_state(15), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint_000000010.pt", "checkpoint_000000015.pt"]
    assert (tmp_path / "checkpoints" / "checkpoint_000000020.pt.unreadable").exists()
    assert ckpt.read_newest(tmp_path)[0].name == "checkpoint_000000015.pt"


def test_without_set_aside_nothing_is_renamed(tmp_path):
    """Readers other than the resuming rank 0 (other ranks, evaluation) only read."""
    ckpt.save_checkpoint(tmp_path, 10, run_state(10))
    truncate(ckpt.save_checkpoint(tmp_path, 20, run_state(20)))
    assert ckpt.read_newest(tmp_path)[0].name == "checkpoint_000000010.pt"
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_nothing_is_set_aside_when_none_reads(tmp_path):
    for step in (10, 20):
        truncate(ckpt.save_checkpoint(tmp_path, step, run_state(step)))
    with pytest.raises(RuntimeError):
        ckpt.read_newest(tmp_path, set_aside=True)
    assert len(ckpt.list_checkpoints(tmp_path)) == 2
