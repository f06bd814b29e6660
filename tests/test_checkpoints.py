"""The checkpoint I/O layer (subboost.io): formats, hostile files, the key rule, layouts,
atomic and exclusive writes."""

import os
from pathlib import Path

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


# ----------------------------------------------------------------------------- the key rule


from subboost.io import (  # noqa: E402
    CheckpointNotFound,
    InputError,
    base_path,
    checkpoint_root_paths,
    current_umask,
    detect_layout,
    expert_path,
    head_path,
    open_checkpoint,
    public_keys,
)


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "module.model.", "image_encoder.model."])
def test_one_prefix_rule_for_every_wrapper(tmp_path, prefix):
    state = {"visual.proj": torch.randn(4, 3), "logit_scale": torch.tensor(2.0)}
    stored = {prefix + k: v for k, v in state.items()}
    if prefix == "image_encoder.model.":
        stored["classification_head.weight"] = torch.randn(5, 3)  # a classifier's head: dropped
    torch.save({**stored, "model_name": "ViT-B-32", "epoch": 7}, tmp_path / "w.pt")  # stray metadata: ignored
    save_state_dict(stored, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        back = load_state_dict(tmp_path / name)
        assert sorted(back) == sorted(state), name
        assert all(torch.equal(back[k], state[k]) for k in state)
    with open_checkpoint(tmp_path / "w.pt") as reader:
        assert sorted(reader.ignored) == ["epoch", "model_name"]


def test_prefix_rule_needs_every_key():
    assert public_keys(["model.a", "b"]) == {"model.a": "model.a", "b": "b"}
    assert public_keys(["module.model.a", "module.model.b"]) == {"a": "module.model.a", "b": "module.model.b"}
    assert public_keys(["weight", "bias"]) == {"weight": "weight", "bias": "bias"}


def test_non_tensor_entries_are_refused_naming_the_key(tmp_path):
    base = {"w": torch.randn(2, 2)}
    for name, extra in (("list", {"bad": [1, 2]}), ("dict", {"bad": {"x": 1}}),
                        ("sparse", {"bad": torch.randn(3, 3).to_sparse()}),
                        ("complex", {"bad": torch.randn(3).to(torch.complex64)})):
        torch.save({**base, **extra}, tmp_path / f"{name}.pt")
        with pytest.raises(InputError, match=rf"{name}\.pt.*'bad'"):
            open_checkpoint(tmp_path / f"{name}.pt")


# ----------------------------------------------------------------------------- safetensors via the library


def test_safetensors_is_read_by_the_library_and_validated(tmp_path):
    import json

    good = {"a": torch.arange(8, dtype=torch.float32).reshape(2, 4), "b": torch.ones(4)}
    save_state_dict(good, tmp_path / "good.safetensors", metadata={"k": "v"})
    with open_checkpoint(tmp_path / "good.safetensors") as reader:
        assert reader.metadata == {"k": "v"}
        assert torch.equal(reader.read("a", (1, 2)), good["a"][1:2])
    data = (torch.arange(8, dtype=torch.float32).numpy().tobytes() + torch.ones(4).numpy().tobytes())

    def crafted(name: str, header: dict, blob: bytes = data):
        raw = json.dumps(header).encode()
        (tmp_path / name).write_bytes(len(raw).to_bytes(8, "little") + raw + blob)
        return tmp_path / name

    a = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}
    b = {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}
    cases = [
        crafted("negative_offsets.safetensors", {"a": {**a, "data_offsets": [-16, 16]}, "b": b}),
        crafted("overlap.safetensors", {"a": a, "b": {**b, "data_offsets": [16, 32]}}),
        crafted("negative_shape.safetensors", {"a": {**a, "shape": [-2, 4]}, "b": b}),
        crafted("bad_dtype.safetensors", {"a": {**a, "dtype": "Q4"}, "b": b}),
        crafted("metadata_list.safetensors", {"__metadata__": [["a", "b"]], "a": a, "b": b}),
        crafted("metadata_int.safetensors", {"__metadata__": {"a": 1}, "a": a, "b": b}),
        crafted("short.safetensors", {"a": a, "b": b}, data[:20]),
        crafted("gap.safetensors", {"a": a, "b": {**b, "data_offsets": [36, 52]}}, data + b"\0" * 4),
    ]
    for path in cases:
        with pytest.raises(InputError, match=rf"{path.name}: not a valid safetensors file"):
            open_checkpoint(path)
    if hasattr(torch, "float8_e5m2"):
        from safetensors.torch import save_file

        save_file({"a": torch.ones(4).to(torch.float8_e5m2)}, tmp_path / "fp8.safetensors")
        with pytest.raises(InputError, match=r"fp8\.safetensors: key 'a' has dtype F8_E5M2"):
            open_checkpoint(tmp_path / "fp8.safetensors")


# ----------------------------------------------------------------------------- unpickling


EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"w": torch.zeros(2), "payload": Evil()}, sys.argv[1])
"""


def test_restricted_unpickler_never_runs_code(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "evil.py"
    script.write_text(EVIL)
    marker = tmp_path / "PWNED"
    subprocess.run([sys.executable, str(script), str(tmp_path / "evil.pt"), str(marker)], check=True)
    with pytest.raises(InputError, match="allow-pickle"):
        open_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"evil\.pt: refusing to unpickle '(posix|os)\.system'"):
        open_checkpoint(tmp_path / "evil.pt", allow_pickle=True)
    assert not marker.exists()


# ----------------------------------------------------------------------------- layouts


def test_layouts_prefer_safetensors_and_name_what_is_missing(tmp_path):
    m = tmp_path / "ViT-B-32"
    for task in ("MNIST", "Cars"):
        (m / f"{task}Val").mkdir(parents=True)
        for suffix in (".pt", ".safetensors"):
            (m / f"{task}Val" / f"nonlinear_finetuned{suffix}").write_bytes(b"x")
    (m / "MNISTVal" / "nonlinear_zeroshot.pt").write_bytes(b"x")
    (m / "head_CarsVal.pt").write_bytes(b"x")
    (m / "head_CarsVal.safetensors").write_bytes(b"x")
    assert detect_layout(tmp_path, "ViT-B-32") == "tall_masks"
    assert base_path(tmp_path, "ViT-B-32", "tall_masks") == m / "MNISTVal" / "nonlinear_zeroshot.pt"
    assert expert_path(tmp_path, "ViT-B-32", "CarsVal", "tall_masks") == m / "CarsVal" / "nonlinear_finetuned.safetensors"
    assert head_path(tmp_path, "ViT-B-32", "Cars") == m / "head_CarsVal.safetensors"
    base, experts = checkpoint_root_paths(tmp_path, "ViT-B-32", ["Cars", "MNIST"])
    assert experts == [m / "CarsVal" / "nonlinear_finetuned.safetensors", m / "MNISTVal" / "nonlinear_finetuned.safetensors"]
    with pytest.raises(CheckpointNotFound, match=r"'DTD'.*DTDVal/nonlinear_finetuned\.safetensors"):
        expert_path(tmp_path, "ViT-B-32", "DTD", "tall_masks")
    with pytest.raises(FileNotFoundError, match="head_DTDVal"):
        head_path(tmp_path, "ViT-B-32", "DTD")


# ----------------------------------------------------------------------------- writing


def test_exclusive_publication_refuses_a_name_taken_meanwhile(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(InputError, match="exists"):
        with atomic_path(target, overwrite=False) as tmp:
            tmp.write_text("mine")
            target.write_text("someone else's")  # a concurrent writer published first
    assert target.read_text() == "someone else's"
    assert os.listdir(tmp_path) == ["out.bin"]
    with atomic_path(target, overwrite=True) as tmp:
        tmp.write_text("replaced")
    assert target.read_text() == "replaced" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_published_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        save_state_dict({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_removes_the_folders_it_created(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match=r"out\.bin.*cannot"):
        with atomic_path(Path("/proc/nope/out.bin")):
            pass


def test_empty_files_and_special_paths(tmp_path):
    (tmp_path / "none.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match=r"none\.safetensors: holds no tensors"):
        open_checkpoint(tmp_path / "none.safetensors")
    torch.save({"epoch": 3}, tmp_path / "none.pt")
    with pytest.raises(InputError, match=r"none\.pt: holds no tensors"):
        open_checkpoint(tmp_path / "none.pt")
    os.mkfifo(tmp_path / "fifo.pt")  # would block a reader forever
    with pytest.raises(InputError, match="not a file"):
        open_checkpoint(tmp_path / "fifo.pt")
    with pytest.raises(InputError, match="not a file"):
        open_checkpoint(tmp_path)
