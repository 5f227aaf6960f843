"""The one atomic writer: complete or absent, the old file kept on failure, no temporary left, fsync and mode."""

from __future__ import annotations

import os
import pickle
import stat

import numpy as np
import pytest
import torch

from fedhypevae import atomic
from fedhypevae.atomic import (
    atomic_open,
    atomic_path,
    atomic_savez,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
)


def _entries(d):
    return sorted(p.name for p in d.iterdir())


def test_each_shape_writes_the_file_and_leaves_nothing_else(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.json", "{}\n")  # the parent is made
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    atomic_savez(tmp_path / "s.shard", {"x": np.ones(2), "y": np.arange(2)})  # no .npz appended
    with atomic_path(tmp_path / "p.csv") as tmp:
        tmp.write_text("x0,label\n")
    assert (tmp_path / "a" / "t.json").read_text() == "{}\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))
    with np.load(tmp_path / "s.shard") as z:
        assert z["y"].tolist() == [0, 1]
    assert (tmp_path / "p.csv").read_text() == "x0,label\n"
    assert _entries(tmp_path) == ["a", "b.bin", "m.pt", "p.csv", "s.shard"]
    assert _entries(tmp_path / "a") == ["t.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    f = tmp_path / "results.json"
    atomic_write_text(f, "old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(f, "w") as h:
        h.write("half of the new")
        raise RuntimeError("disk full")
    with pytest.raises((pickle.PicklingError, AttributeError)), atomic_open(tmp_path / "m.pt") as h:
        torch.save({"f": lambda: 0}, h)
    assert f.read_text() == "old\n"
    assert _entries(tmp_path) == ["results.json"]


def test_replacing_is_atomic_the_name_never_points_at_a_partial_file(tmp_path):
    f = tmp_path / "x.npz"
    atomic_savez(f, {"x": np.zeros(3)})
    with atomic_open(f) as h:
        h.write(b"partial")
        with np.load(f) as z:  # mid-write, readers still see the complete old file
            assert z["x"].tolist() == [0.0, 0.0, 0.0]
    assert f.read_bytes() == b"partial"


def test_fsync_flushes_the_temporary_before_the_rename_and_only_when_asked(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (tmp_path / "c.pt").exists()))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == []
    atomic_torch_save({"a": 1}, tmp_path / "c.pt", fsync=True)
    ((name, target_there),) = synced
    assert name.endswith(".tmp") and ".c.pt." in name and not target_there


def test_owner_only_files_are_private_whatever_the_umask_and_others_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "shard.npz", b"records", owner_only=True)
        atomic_write_text(tmp_path / "public.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shard.npz").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "public.json").stat().st_mode) == 0o644


def test_atomic_open_only_writes_new_files(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "log", "a"):
        pass
    assert _entries(tmp_path) == []


def test_a_save_without_crc32_loads_whole_and_leaves_the_global_option_as_it_was(tmp_path):
    """Checkpoint shards skip the zip records' CRC-32 (the write's largest cost at hundreds of MB); torch.load reads
    them back exactly, the file really carries no CRC, and other saves keep computing it."""
    import zipfile

    t = torch.randn(1000, 17)
    atomic_torch_save({"t": t}, tmp_path / "a.pt", crc32=False)
    atomic_torch_save({"t": t}, tmp_path / "b.pt")
    assert torch.serialization.get_crc32_options() is True
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["t"], t)
    with zipfile.ZipFile(tmp_path / "a.pt") as z, zipfile.ZipFile(tmp_path / "b.pt") as zb:
        data = [i for i in z.infolist() if i.filename.endswith("/data/0")]
        data_b = [i for i in zb.infolist() if i.filename.endswith("/data/0")]
        assert data and data[0].CRC == 0 and data_b[0].CRC != 0
