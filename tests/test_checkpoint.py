"""Tests for mpdit.training.checkpoint: atomic writes, file formats, layout, RNG state."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from mpdit.errors import MPDiTError
from mpdit.training.checkpoint import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    capture_rng_state,
    checkpoint_dir,
    list_checkpoints,
    load_safetensors,
    load_torch,
    prune_checkpoints,
    read_safetensors_metadata,
    resolve_checkpoint,
    restore_rng_state,
    save_safetensors,
    save_torch,
)


GARBAGE = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_directory_body_raises_leaves_nothing(tmp_path):
    final = tmp_path / "checkpoints" / "step-0000010"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not final.exists()
    assert _siblings(final) == []


def test_atomic_directory_creates_and_replaces(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        assert tmp != final and tmp.parent == final.parent and tmp.is_dir()
        assert not final.exists()
        (tmp / "a.txt").write_text("one")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("two")
    assert (final / "a.txt").read_text() == "one" and (final / "sub" / "b.txt").read_text() == "two"
    with atomic_directory(final) as tmp:
        (tmp / "c.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert _siblings(final) == ["ckpt"]  # no .tmp-* or .old-* left
    # a failing replacement keeps the old directory intact
    with pytest.raises(KeyError):
        with atomic_directory(final) as tmp:
            (tmp / "d.txt").write_text("four")
            raise KeyError("x")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert _siblings(final) == ["ckpt"]


def test_atomic_directory_failed_rename_restores_old(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "old"
    assert _siblings(final) == ["ckpt"]


def test_atomic_write_files(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write_text(path, '{"a": 1}')
    atomic_write_bytes(path, b'{"a": 2}')
    assert path.read_text() == '{"a": 2}'
    assert _siblings(path) == ["f.json"]


def test_failed_file_write_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.pt"
    save_torch(path, {"step": 1})
    with pytest.raises(Exception):
        save_torch(path, {"step": 2, "bad": lambda: 0})  # lambdas cannot be pickled
    assert load_torch(path) == {"step": 1}
    assert _siblings(path) == ["state.pt"]


def test_safetensors_roundtrip_shared_and_strided(tmp_path):
    base = torch.randn(4, 6)
    sd = {"w": base, "tied": base, "t": base.t(), "view": base[:, 1:3], "i": torch.arange(5)}
    path = tmp_path / "m.safetensors"
    save_safetensors(path, sd, {"step": 7, "note": "x"})
    out = load_safetensors(path)
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k])
    assert read_safetensors_metadata(path) == {"step": "7", "note": "x"}
    assert _siblings(path) == ["m.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_gives_one_line_error(tmp_path, damage):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": GARBAGE, "empty": b""}[damage])
    with pytest.raises(MPDiTError) as info:
        load_safetensors(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint file {path} is corrupt or truncated (") and "\n" not in message
    with pytest.raises(MPDiTError, match="corrupt or truncated"):
        read_safetensors_metadata(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_torch_file_gives_one_line_error(tmp_path, damage):
    path = tmp_path / "state.pt"
    save_torch(path, {"x": torch.randn(1000), "n": 3})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": GARBAGE, "empty": b""}[damage])
    with pytest.raises(MPDiTError) as info:
        load_torch(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint file {path} is corrupt or truncated (") and "\n" not in message


def test_missing_files(tmp_path):
    for load in (load_safetensors, load_torch):
        with pytest.raises(MPDiTError, match=f"no checkpoint file at {tmp_path / 'nope'}$"):
            load(tmp_path / "nope")


def test_optimizer_and_rng_state_load_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    path = tmp_path / "train_state.pt"
    save_torch(path, {"optimizer": opt.state_dict(), "rng": capture_rng_state(), "step": 1})
    state = load_torch(path)  # weights_only=True
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3, betas=(0.9, 0.99))
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    restore_rng_state(state["rng"])


class _Custom:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle below
def test_untrusted_objects_refused_clearly(tmp_path):
    path = tmp_path / "obj.pt"
    save_torch(path, {"thing": _Custom()})
    with pytest.raises(MPDiTError, match=r"\(\S*_Custom\) that safe loading refuses") as error:
        load_torch(path)
    assert "weights_only=False" not in str(error.value)  # never suggest the unsafe load
    assert isinstance(load_torch(path, weights_only=False)["thing"], _Custom)
    path.write_bytes(pickle.dumps({"thing": _Custom()}))  # a plain pickle: torch's message names weights_only=False
    with pytest.raises(MPDiTError, match="corrupt or truncated .*Unsupported operand") as error:
        load_torch(path)
    assert "weights_only" not in str(error.value)


def _draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_capture_restore_reproduces_draws(tmp_path):
    np.random.randn()  # leave numpy with a cached gauss value
    state = capture_rng_state()
    first = _draws()
    save_torch(tmp_path / "rng.pt", state)
    restore_rng_state(load_torch(tmp_path / "rng.pt"))
    assert _draws() == first
    assert _draws() != first
    with pytest.raises(MPDiTError, match="bad RNG state"):
        restore_rng_state({"python": random.getstate()})


def test_layout_listing_ignores_temp_dirs(tmp_path):
    assert checkpoint_dir(tmp_path, 1200) == tmp_path / "checkpoints" / "step-0001200"
    for step in (300, 100, 200):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000400.tmp-123").mkdir()  # a killed writer
    (tmp_path / "checkpoints" / "step-0000500.old-123").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("x")
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [100, 200, 300]
    assert list_checkpoints(tmp_path / "missing") == []


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(MPDiTError, match=rf"no checkpoint found in {run} \(expected {run}/checkpoints/step-NNNNNNN/\)"):
        resolve_checkpoint(run)
    run.mkdir()
    with pytest.raises(MPDiTError, match="no checkpoint found in"):
        resolve_checkpoint(run)
    for step in (5, 50):
        checkpoint_dir(run, step).mkdir(parents=True)
    (run / "checkpoints" / "step-0000099.tmp-7").mkdir()
    latest = run / "checkpoints" / "step-0000050"
    assert resolve_checkpoint(run) == latest
    assert resolve_checkpoint(run / "checkpoints") == latest
    assert resolve_checkpoint(run / "checkpoints" / "step-0000005") == run / "checkpoints" / "step-0000005"
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "model.safetensors").write_bytes(b"")
    assert resolve_checkpoint(exported) == exported


def test_prune_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step-0000010", "step-0000020"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert prune_checkpoints(tmp_path, keep=5) == []
    with pytest.raises(MPDiTError, match="keep must be a positive integer"):
        prune_checkpoints(tmp_path, keep=0)
