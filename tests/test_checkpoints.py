"""The checkpoint I/O layer (subboost.io): formats, hostile files, the key rule, layouts,
atomic and exclusive writes."""

import os

import pytest
import torch

from subboost.io import atomic_path, load_state_dict, save_state_dict


def sd():
    return {"visual.proj": torch.randn(4, 3), "logit_scale": torch.tensor(2.0)}


def test_roundtrip_safetensors_and_pt(tmp_path):
    state = sd()
    for name in ("m.safetensors", "m.pt"):
        path = save_state_dict(state, tmp_path / name, metadata={"method": "ta"})
        back = load_state_dict(path)
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "m.safetensors"]  # no temp files left


def test_wrapped_state_dict(tmp_path):
    torch.save({"state_dict": sd(), "epoch": 3}, tmp_path / "w.pt")
    assert set(load_state_dict(tmp_path / "w.pt")) == {"visual.proj", "logit_scale"}


def test_pickled_module_needs_allow_pickle(tmp_path):
    module = torch.nn.Linear(3, 2)
    torch.save(module, tmp_path / "mod.pt")
    with pytest.raises(ValueError, match="mod.pt.*allow_pickle"):
        load_state_dict(tmp_path / "mod.pt")
    back = load_state_dict(tmp_path / "mod.pt", allow_pickle=True)
    assert torch.equal(back["weight"], module.weight.detach())


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("original")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert os.listdir(tmp_path) == ["out.bin"]
