"""Atomic writes keep the old file on failure and report a full disk clearly."""

import errno

import pytest

from zturbo_train import fileio


def test_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    fileio.write_json(target, {"x": 1})
    fileio.write_json(target, {"x": 2})
    assert '"x": 2' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failure_keeps_old_file(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fileio.write_with(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_disk_full_is_a_clear_error(tmp_path):
    target = tmp_path / "state.safetensors"
    target.write_bytes(b"old")

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(fileio.DiskFullError, match="disk full while writing .*state.safetensors; free space"):
        fileio.write_with(target, full)
    assert target.read_bytes() == b"old"
