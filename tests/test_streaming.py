"""Streaming readers, writer and merges against the in-memory library functions, on tiny
synthetic checkpoints with open_clip key names."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from subboost.io import (
    InputError,
    SafetensorsReader,
    SafetensorsWriter,
    TensorInfo,
    TorchReader,
    checkpoint_root_paths,
    load_state_dict,
    open_checkpoint,
)
from subboost.merging import _ties_thresholds, merge, ties_trim_thresholds
from subboost.streaming import (
    CheckpointTaskVectors,
    check_compatible,
    merged_deltas,
    stream_merge,
)
from subboost.taskvector import apply_task_vector, task_vectors

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny LAPACK calls on a shared, oversubscribed 2-core machine stall on spinning BLAS
    threads (0.5 s per 96 × 32 SVD); one thread keeps these tests fast. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clip_state_dict(width: int = 32, layers: int = 2, text_layers: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny CLIP state dict with open_clip's key names (visual and text towers)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    sd: dict[str, torch.Tensor] = {
        "positional_embedding": r(7, width),
        "text_projection": r(width, 16),
        "logit_scale": torch.tensor(4.6052),
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(5, width),
        "visual.proj": r(width, 16),
        "visual.conv1.weight": r(width, 3, 4, 4),
        "visual.ln_pre.weight": 1 + r(width),
        "visual.ln_pre.bias": r(width),
    }
    for stack, n in (("visual.transformer.resblocks", layers), ("transformer.resblocks", text_layers)):
        for l in range(n):
            p = f"{stack}.{l}."
            sd.update({
                p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
                p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
                p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
                p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width),
            })
    sd.update({
        "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width),
        "token_embedding.weight": r(64, width),
        "ln_final.weight": 1 + r(width), "ln_final.bias": r(width),
        "position_ids": torch.arange(7),  # an integer buffer: copied, never merged
    })
    return sd


def expert_state_dict(base: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Fine-tuned visual tower (shared low-rank direction + task part + noise); the text
    tower stays frozen (zero task vector), as in the public CLIP experts."""
    g = torch.Generator().manual_seed(1000 + seed)
    shared = torch.Generator().manual_seed(7)
    out = {}
    for key, value in base.items():
        if not value.is_floating_point() or not key.startswith("visual."):
            out[key] = value.clone()
            continue
        delta = torch.randn(value.shape, generator=g) * scale
        if value.ndim == 2:
            u = torch.randn(value.shape[0], 2, generator=shared)
            v = torch.randn(2, value.shape[1], generator=shared)
            delta = delta + 5 * scale * (u @ v) / value.shape[1] ** 0.5
        out[key] = value + delta
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Base + 3 experts as safetensors and .pt state dicts."""
    root = tmp_path_factory.mktemp("ckpts")
    base = clip_state_dict()
    experts = [expert_state_dict(base, s) for s in range(3)]
    save_file(base, root / "base.safetensors")
    torch.save(base, root / "base.pt")
    paths_st, paths_pt = [], []
    for i, e in enumerate(experts):
        save_file(e, root / f"task{i}.safetensors")
        torch.save(e, root / f"task{i}.pt")
        paths_st.append(root / f"task{i}.safetensors")
        paths_pt.append(root / f"task{i}.pt")
    return dict(root=root, base=base, experts=experts, base_st=root / "base.safetensors", base_pt=root / "base.pt",
                experts_st=paths_st, experts_pt=paths_pt)


def library_merge(base, experts, method, *, params=None, boost=None, boost_options=None, lines_b=None, lines_a=None,
                  alpha=1.0, lines_order="after_boost"):
    vectors = list(task_vectors(base, {f"e{i}": e for i, e in enumerate(experts)}).values())
    delta = merge(vectors, method, boost_beta=boost, boost_options=boost_options, lines_b=lines_b, lines_a=lines_a,
                  lines_order=lines_order, **(params or {}))
    return apply_task_vector(base, delta, alpha), delta


def open_all(ckpts, kind="st"):
    base = open_checkpoint(ckpts[f"base_{kind}"])
    experts = [open_checkpoint(p) for p in ckpts[f"experts_{kind}"]]
    return base, experts


def assert_close_dicts(a, b, rtol=1e-5, atol=1e-6):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].double(), b[k].double(), rtol=rtol, atol=atol), k


# ----------------------------------------------------------------------------- readers / writer


@pytest.mark.parametrize("kind", ["st", "pt"])
def test_readers_return_the_stored_tensors(ckpts, kind):
    reader = open_checkpoint(ckpts[f"base_{kind}"])
    assert isinstance(reader, SafetensorsReader if kind == "st" else TorchReader)
    assert sorted(reader.keys()) == sorted(ckpts["base"])
    for key, value in ckpts["base"].items():
        assert reader.info(key) == TensorInfo(tuple(value.shape), value.dtype)
        assert torch.equal(reader.read(key), value)
    emb = ckpts["base"]["token_embedding.weight"]
    assert torch.equal(reader.read("token_embedding.weight", (10, 23)), emb[10:23])
    reader.close()


def test_safetensors_reader_dtypes_and_writer_round_trip(tmp_path):
    tensors = {
        "a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.randn(5).half(), "c": torch.tensor(2.5, dtype=torch.float64),
        "d": torch.tensor([True, False, True]), "e": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "f": torch.empty(0, 4),
    }
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}, {"hello": "world"})
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    loaded = load_file(path)  # the official reader accepts our file
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    reader = SafetensorsReader(path)
    assert reader.metadata == {"hello": "world"}
    for k, v in tensors.items():
        assert torch.equal(reader.read(k), v), k
    assert torch.equal(reader.read("e", (1, 2)), tensors["e"][1:2])


def test_writer_enforces_header_order_and_shapes(tmp_path):
    writer = SafetensorsWriter(tmp_path / "y.safetensors", {"a": TensorInfo((2,), torch.float32), "b": TensorInfo((1,), torch.float32)})
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("b", torch.zeros(1))
    with pytest.raises(RuntimeError, match="header says"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_bad_files_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello world")
    with pytest.raises(InputError, match="not a valid safetensors file"):
        open_checkpoint(junk)
    junk_pt = tmp_path / "junk.pt"
    junk_pt.write_bytes(b"not a torch file at all")
    with pytest.raises(InputError, match="cannot read as a torch checkpoint"):
        open_checkpoint(junk_pt)


def test_legacy_and_wrapped_torch_files(tmp_path):
    sd = {"w": torch.randn(4, 3), "n": torch.arange(3)}
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("legacy.pt", "wrapped.pt"):
        reader = open_checkpoint(tmp_path / name)
        assert sorted(reader.keys()) == ["n", "w"]
        assert torch.equal(reader.read("w"), sd["w"])


PICKLED_MODULE_SCRIPT = textwrap.dedent("""
    import sys, types, torch
    mod = types.ModuleType("src.modeling"); sys.modules["src"] = types.ModuleType("src"); sys.modules["src.modeling"] = mod
    class Block(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(w, 2)
            self.mlp = torch.nn.Sequential()
            self.mlp.add_module("c_fc", torch.nn.Linear(w, 4 * w))
            self.mlp.add_module("c_proj", torch.nn.Linear(4 * w, w))
            self.register_buffer("scratch", torch.zeros(2), persistent=False)
    class Preprocess:  # a plain (non-module) attribute, like torchvision transforms
        def __init__(self):
            self.size = 224
    class ImageEncoder(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.model = torch.nn.Module()
            self.model.visual = torch.nn.Module()
            self.model.visual.transformer = torch.nn.Module()
            self.model.visual.transformer.resblocks = torch.nn.ModuleList([Block(8) for _ in range(2)])
            self.model.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
            self.train_preprocess = Preprocess()
    for c in (Block, Preprocess, ImageEncoder):
        c.__module__ = "src.modeling"; setattr(mod, c.__name__, c)
    torch.save(ImageEncoder(int(sys.argv[2])), sys.argv[1])
    torch.save(ImageEncoder(int(sys.argv[2])).state_dict(), sys.argv[1] + ".sd.pt")
""")


def write_pickled_module(path: Path, seed: int) -> Path:
    """A pickled nn.Module whose class lives in a module that does not exist at load time
    (as the public task-vector checkpoints pickle ``src.modeling.ImageEncoder``)."""
    script = path.parent / "make_pickle.py"
    script.write_text(PICKLED_MODULE_SCRIPT)
    subprocess.run([sys.executable, str(script), str(path), str(seed)], check=True)
    return path


def test_pickled_module_needs_permission_and_loads_without_its_code(tmp_path):
    path = write_pickled_module(tmp_path / "encoder.pt", seed=1)
    with pytest.raises(InputError, match="allow-pickle"):
        open_checkpoint(path)
    reader = open_checkpoint(path, allow_pickle=True)
    stored = torch.load(str(path) + ".sd.pt", weights_only=True)
    assert "model.visual.transformer.resblocks.0.attn.in_proj_weight" in stored
    expected = {k.removeprefix("model."): v for k, v in stored.items()}  # the one prefix rule
    assert sorted(reader.keys()) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(reader.read(k), v), k


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release uses /proc and madvise")
def test_mapped_pages_are_released(tmp_path):
    """Reading a 256 MiB .pt tensor by tensor keeps the resident set far below the file size."""
    path = tmp_path / "big.pt"
    torch.save({f"t{i}": torch.randn(1024, 4096) for i in range(16)}, path)
    # VmHWM (this address space's peak): getrusage's ru_maxrss survives execve and would
    # report the forking pytest process instead
    script = textwrap.dedent(f"""
        import torch
        from subboost.io import open_checkpoint
        def peak():
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
        before = peak()
        reader = open_checkpoint({str(path)!r})
        total = 0.0
        for k in reader.keys():
            total += float(reader.read(k).sum())
        print((peak() - before) / 1024)
    """)
    grown = float(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert grown < 128, f"resident set grew by {grown:.0f} MiB for a 256 MiB file"


# ----------------------------------------------------------------------------- engine vs library


METHOD_CASES = [
    ("ta", {}), ("average", {}), ("ties", {"top_k": 0.2}), ("ties", {"top_k": 0.7}),
    ("consensus", {"k": 2, "lambdas": 0.4}), ("consensus", {"k": 2, "base": "ties", "top_k": 0.3}),
    ("ties", {"top_k": 0.2, "trim": "top_k"}),
    ("consensus", {"k": 2, "base": "ties", "top_k": 0.3, "ties_aggregate": "mean", "trim": "top_k"}),
    ("iso-c", {}), ("iso-cts", {}), ("tsv", {}), ("ho-sb", {}),
]


@pytest.mark.parametrize("method,params", METHOD_CASES)
@pytest.mark.parametrize("boost", [None, 0.0])
def test_streamed_deltas_match_library(ckpts, method, params, boost):
    base, experts = open_all(ckpts)
    streamed = dict(merged_deltas(base, experts, method, params=params, boost_beta=boost))
    _, expected = library_merge(ckpts["base"], ckpts["experts"], method, params=params, boost=boost)
    assert_close_dicts(streamed, expected)


@pytest.mark.parametrize("method,params", [("ta", {}), ("ties", {"top_k": 0.2}), ("consensus", {"k": 2})])
def test_row_blocks_give_the_same_result(ckpts, method, params):
    base, experts = open_all(ckpts, "pt")
    whole = dict(merged_deltas(base, experts, method, params=params, boost_beta=0.0))
    tiny = dict(merged_deltas(base, experts, method, params=params, boost_beta=0.0, memory_budget=1))
    plan = CheckpointTaskVectors(base, experts, ["a", "b", "c"], list(whole), torch.device("cpu"), 1)
    assert len(plan.row_blocks("token_embedding.weight")) == 64  # one row per block
    assert plan.row_blocks("visual.transformer.resblocks.0.mlp.c_fc.weight") == [None]  # SB needs whole matrices
    assert_close_dicts(whole, tiny, rtol=0, atol=0)


def brute_force_thresholds(vectors, top_k, trim="official"):
    """Per task, the m-th largest magnitude over every entry (float64 sort), m = ⌊P·K⌋ + 1
    (official) or max(1, ⌊P·K⌋) (top_k), computed here from the definition."""
    out = []
    for tv in vectors:
        flat = torch.cat([v.reshape(-1).double().abs() for v in tv.values()]).sort(descending=True).values
        p = flat.numel()
        share = int(p * top_k)
        m = min(p, share + 1) if trim == "official" else max(1, share)
        out.append(float(flat[m - 1]))
    return out


def test_ties_thresholds_are_exact(ckpts):
    base, experts = open_all(ckpts)
    vectors = list(task_vectors(ckpts["base"], {f"e{i}": e for i, e in enumerate(ckpts["experts"])}).values())
    keys = check_compatible(base, experts, ["a", "b", "c"])
    for top_k in (0.01, 0.2, 0.5, 1.0):
        for budget in (1 << 20, 1) if top_k == 0.2 else (1 << 20,):  # whole tensors; one row per block
            plan = CheckpointTaskVectors(base, experts, ["a", "b", "c"], keys, torch.device("cpu"), budget)
            for trim in ("official", "top_k"):
                expected = brute_force_thresholds(vectors, top_k, trim)
                assert _ties_thresholds(plan, top_k, trim) == expected
                assert ties_trim_thresholds(vectors, top_k, trim) == expected


def test_ties_thresholds_are_exact_in_float64(tmp_path):
    # float64 task vectors whose magnitudes float32 cannot separate: the streamed selection
    # ranks the float64 bit patterns, as torch.kthvalue in float64 does
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(40, 8, generator=g, dtype=torch.float64), "b": torch.randn(8, generator=g, dtype=torch.float64)}
    experts = []
    for i in range(2):
        e = {k: v + 1e-3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
        e["w"][0, :6] = base["w"][0, :6] + torch.tensor([1 + 3e-12, -(1 + 2e-12), 1 + 1e-12, 1.0, 1 - 1e-12, 0.9], dtype=torch.float64)
        experts.append(e)
        save_file(e, tmp_path / f"e{i}.safetensors")
    save_file(base, tmp_path / "base.safetensors")
    vectors = list(task_vectors(base, {f"e{i}": e for i, e in enumerate(experts)}).values())
    reader = open_checkpoint(tmp_path / "base.safetensors")
    readers = [open_checkpoint(tmp_path / f"e{i}.safetensors") for i in range(2)]
    keys = check_compatible(reader, readers, ["a", "b"])
    plan = CheckpointTaskVectors(reader, readers, ["a", "b"], keys, torch.device("cpu"), 1 << 20)
    total = sum(v.numel() for v in vectors[0].values())
    for top_k in (2 / total, 3 / total, 0.2):
        for trim in ("official", "top_k"):
            expected = brute_force_thresholds(vectors, top_k, trim)
            assert _ties_thresholds(plan, top_k, trim) == expected
            assert ties_trim_thresholds(vectors, top_k, trim=trim) == expected
    streamed = dict(merged_deltas(reader, readers, "ties", params={"top_k": 3 / total}))
    expected = merge(vectors, "ties", top_k=3 / total)
    for k in expected:
        assert torch.equal(streamed[k], expected[k]), k


@pytest.mark.parametrize("kwargs", [
    dict(method="ta", boost=0.0, alpha=0.3),
    dict(method="ties", params={"top_k": 0.2}, boost=0.0, alpha=1.0),
    dict(method="ta", boost=0.0, lines_b=0.5, alpha=0.8),
    dict(method="ta", boost=None, lines_b=0.5, lines_a=0.2, alpha=1.0),
    dict(method="average", boost=0.02, alpha=1.0, boost_options={"layer_types": ["mlp"], "route": "gram"}),
    dict(method="ta", boost=0.0, lines_b=0.5, alpha=0.8, lines_order="before_boost"),
    dict(method="ta", boost=0.0, alpha=0.5, boost_options={"attention": "heads", "num_heads": 4}),
    dict(method="ta", boost=0.0, alpha=0.5, boost_options={"attention": "qkv"}),
])
def test_stream_merge_writes_the_library_model(ckpts, tmp_path, kwargs):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    base, experts = open_all(ckpts, "pt")
    out = tmp_path / "merged.safetensors"
    report = stream_merge(base, experts, out, method, params=kwargs.get("params"), alpha=kwargs["alpha"],
                          boost_beta=kwargs.get("boost"), boost_options=kwargs.get("boost_options"),
                          lines_b=kwargs.get("lines_b"), lines_a=kwargs.get("lines_a"), metadata={"note": "x"},
                          lines_order=kwargs.get("lines_order", "after_boost"))
    expected, _ = library_merge(ckpts["base"], ckpts["experts"], method, params=kwargs.get("params"),
                                boost=kwargs.get("boost"), boost_options=kwargs.get("boost_options"),
                                lines_b=kwargs.get("lines_b"), lines_a=kwargs.get("lines_a"), alpha=kwargs["alpha"],
                                lines_order=kwargs.get("lines_order", "after_boost"))
    got = load_file(out)
    assert_close_dicts({k: got[k] for k in expected}, expected)
    assert torch.equal(got["position_ids"], ckpts["base"]["position_ids"])
    assert report.n_tensors == len(ckpts["base"])
    assert sorted(os.listdir(tmp_path)) == ["merged.safetensors"]  # no temporary files left


def test_stream_merge_mixed_dtypes(ckpts, tmp_path):
    base16 = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpts["base"].items()}
    experts16 = [{k: (v.half() if v.is_floating_point() else v) for k, v in e.items()} for e in ckpts["experts"]]
    save_file(base16, tmp_path / "b16.safetensors")
    for i, e in enumerate(experts16):
        save_file(e, tmp_path / f"e16_{i}.safetensors")
    base = open_checkpoint(tmp_path / "b16.safetensors")
    experts = [open_checkpoint(tmp_path / f"e16_{i}.safetensors") for i in range(3)]
    out = tmp_path / "m16.safetensors"
    stream_merge(base, experts, out, "ta", boost_beta=0.0, alpha=0.5)
    expected, _ = library_merge(base16, experts16, "ta", boost=0.0, alpha=0.5)
    got = load_file(out)
    assert all(got[k].dtype == base16[k].dtype for k in base16)
    assert_close_dicts({k: got[k] for k in expected}, expected, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- bad input


def test_non_finite_expert_names_file_and_key_and_leaves_nothing(ckpts, tmp_path):
    bad = {k: v.clone() for k, v in ckpts["experts"][1].items()}
    bad["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, 3] = float("nan")
    save_file(bad, tmp_path / "bad.safetensors")
    base = open_checkpoint(ckpts["base_st"])
    experts = [open_checkpoint(ckpts["experts_st"][0]), open_checkpoint(tmp_path / "bad.safetensors")]
    with pytest.raises(ValueError, match=r"bad.*resblocks\.1\.mlp\.c_fc\.weight.*NaN"):
        stream_merge(base, experts, tmp_path / "out.safetensors", "ta", boost_beta=0.0)
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


def test_mismatched_keys_and_shapes(ckpts, tmp_path):
    base = open_checkpoint(ckpts["base_st"])
    missing = {k: v for k, v in ckpts["experts"][0].items() if k != "visual.proj"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match=r"keys differ.*visual\.proj"):
        check_compatible(base, [open_checkpoint(tmp_path / "missing.safetensors")], ["m"])
    wrong = dict(ckpts["experts"][0])
    wrong["visual.proj"] = torch.zeros(3, 3)
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(InputError, match=r"shape mismatch for key 'visual\.proj'"):
        check_compatible(base, [open_checkpoint(tmp_path / "wrong.safetensors")], ["w"])


def test_output_equal_to_input_is_refused(ckpts):
    base, experts = open_all(ckpts)
    with pytest.raises(InputError, match="refusing to overwrite an input"):
        stream_merge(base, experts, ckpts["experts_st"][0], "ta")
    assert torch.equal(load_file(ckpts["experts_st"][0])["visual.proj"], ckpts["experts"][0]["visual.proj"])


def test_unknown_method_and_parameter(ckpts):
    base, experts = open_all(ckpts)
    with pytest.raises(InputError, match="unknown merging method 'nope'"):
        next(merged_deltas(base, experts, "nope"))
    with pytest.raises(InputError, match="has no parameter 'topk'"):
        next(merged_deltas(base, experts, "ties", params={"topk": 0.2}))


def test_checkpoint_root_layouts(tmp_path):
    new = tmp_path / "new" / "ViT-B-32"
    for task in ("MNIST", "Cars"):
        (new / f"{task}Val").mkdir(parents=True)
        (new / f"{task}Val" / "nonlinear_finetuned.pt").write_bytes(b"x")
    (new / "MNISTVal" / "nonlinear_zeroshot.pt").write_bytes(b"x")
    base, experts = checkpoint_root_paths(tmp_path / "new", "ViT-B-32", ["Cars", "MNISTVal"])
    assert base == new / "MNISTVal" / "nonlinear_zeroshot.pt"
    assert experts == [new / "CarsVal" / "nonlinear_finetuned.pt", new / "MNISTVal" / "nonlinear_finetuned.pt"]
    old = tmp_path / "old" / "ViT-B-32"
    (old / "DTD").mkdir(parents=True)
    (old / "DTD" / "finetuned.pt").write_bytes(b"x")
    (old / "zeroshot.pt").write_bytes(b"x")
    assert checkpoint_root_paths(tmp_path / "old", "ViT-B-32", ["DTD"]) == (old / "zeroshot.pt", [old / "DTD" / "finetuned.pt"])
    with pytest.raises(InputError, match="task 'SVHN'"):
        checkpoint_root_paths(tmp_path / "old", "ViT-B-32", ["SVHN"])
    with pytest.raises(InputError, match="no checkpoint folder"):
        checkpoint_root_paths(tmp_path / "old", "ViT-L-14", ["DTD"])


def test_library_loader_agrees_with_reader(ckpts):
    sd = load_state_dict(ckpts["base_pt"])
    reader = open_checkpoint(ckpts["base_pt"])
    assert all(torch.equal(reader.read(k), v) for k, v in sd.items())


# ----------------------------------------------------------------------------- one engine: memory = streamed


ENGINE_PARAMS = {
    "ta": {}, "average": {}, "ties": {"top_k": 0.3}, "consensus": {"k": 2, "base": "ties", "top_k": 0.3},
    "iso-c": {}, "iso-cts": {}, "tsv": {}, "ho-sb": {},
}
ENGINE_POST = [
    dict(),
    dict(boost_beta=0.0),
    dict(boost_beta=0.0, lines_b=0.5),  # default a: a whole-model statistic of the boosted update
    dict(boost_beta=0.0, lines_b=0.5, lines_order="before_boost"),
    dict(boost_beta=0.02, lines_b=0.4, lines_a=0.2, lines_order="before_boost", boost_options={"attention": "qkv"}),
]


def test_engine_cases_cover_every_streamable_method():
    from subboost.merging import METHODS

    # ESM needs activations, which checkpoints do not hold: it is merged in memory only
    assert set(ENGINE_PARAMS) == {name for name, m in METHODS.items() if not m.whole_model}


@pytest.fixture(scope="module", params=[torch.float32, torch.float16, torch.bfloat16, torch.float64],
                ids=lambda d: str(d).split(".")[1])
def typed_ckpts(request, tmp_path_factory):
    """Base + 3 experts in one dtype (tiny CLIP, several keys of each kind), as safetensors."""
    dtype = request.param
    root = tmp_path_factory.mktemp(f"typed_{str(dtype).split('.')[1]}")
    cast = lambda sd: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}  # noqa: E731
    base = clip_state_dict(width=16)
    experts = [cast(expert_state_dict(base, s)) for s in range(3)]
    base = cast(base)
    save_file(base, root / "base.safetensors")
    for i, e in enumerate(experts):
        save_file(e, root / f"e{i}.safetensors")
    return dict(root=root, base=base, experts=experts)


@pytest.mark.parametrize("method", list(ENGINE_PARAMS))
def test_memory_and_streamed_give_identical_tensors(typed_ckpts, method, tmp_path):
    """The in-memory merge and the streamed merge (row blocks of a few rows, LiNeS with its
    spill file) give the same tensors bit for bit: one engine, one kernel per method."""
    root, params = typed_ckpts["root"], ENGINE_PARAMS[method]
    order = open_checkpoint(root / "base.safetensors").keys()  # LiNeS' a sums per-key norms in key order
    vectors = [{k: tv[k] for k in order if k in tv}
               for tv in task_vectors(typed_ckpts["base"], {f"e{i}": e for i, e in enumerate(typed_ckpts["experts"])}).values()]
    for post in ENGINE_POST:
        in_memory = merge(vectors, method, **post, **params)
        assert all(in_memory[k].dtype == vectors[0][k].dtype for k in in_memory)
        base = open_checkpoint(root / "base.safetensors")
        experts = [open_checkpoint(root / f"e{i}.safetensors") for i in range(3)]
        if "lines_b" not in post:
            streamed = dict(merged_deltas(base, experts, method, params=params, memory_budget=4096,
                                          boost_beta=post.get("boost_beta"), boost_options=post.get("boost_options")))
            assert sorted(streamed) == sorted(in_memory)
            for k in in_memory:
                assert streamed[k].dtype == in_memory[k].dtype and torch.equal(streamed[k], in_memory[k]), (post, k)
        out = tmp_path / "merged.safetensors"
        stream_merge(base, experts, out, method, params=params, alpha=0.7, memory_budget=4096, overwrite=True, **post)
        expected = apply_task_vector(typed_ckpts["base"], in_memory, 0.7)
        got = load_file(out)
        for k in expected:
            assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), (post, k)
