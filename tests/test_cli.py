"""The installed ``subboost`` command, driven as a subprocess on tiny synthetic
checkpoints with open_clip key names; merged tensors are checked against the library."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from subboost.boost import boost_task_vector
from subboost.merging import merge
from subboost.spectral import rank_table
from subboost.taskvector import apply_task_vector, task_vectors

sys.path.insert(0, str(Path(__file__).parent))
from test_streaming import clip_state_dict, expert_state_dict, write_pickled_module  # noqa: E402

EXE = Path(sys.executable).with_name("subboost")
ENTRY = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "subboost.cli"]


# One BLAS/OpenMP thread per subprocess: on a shared, oversubscribed 2-core machine the
# tiny LAPACK calls of these checkpoints otherwise stall on spinning threads (0.5 s per SVD).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(*args: object, cwd: Path | None = None, module: bool = False) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, "-m", "subboost.cli"] if module else ENTRY) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300, env=ENV)


def assert_bad_input(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


TASKS = ["Cars", "DTD", "EuroSAT", "GTSRB"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The library references in this process run on one thread too (see ENV)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    base = clip_state_dict(width=32)
    experts = {t: expert_state_dict(base, i) for i, t in enumerate(TASKS)}
    save_file(base, root / "base.safetensors")
    torch.save(base, root / "base.pt")
    for t, e in experts.items():
        save_file(e, root / f"{t}.safetensors")
        torch.save(e, root / f"{t}.pt")
    return dict(root=root, base=base, experts=experts)


def expected_model(data: dict, names: list[str], method: str, *, alpha: float, boost=None, params=None, **kw) -> dict:
    vectors = list(task_vectors(data["base"], {n: data["experts"][n] for n in names}).values())
    delta = merge(vectors, method, boost_beta=boost, **(params or {}), **kw)
    return apply_task_vector(data["base"], delta, alpha)


def assert_model(path: Path, expected: dict, tol: float = 1e-6) -> None:
    """Same keys and dtypes; per tensor, relative Frobenius error ≤ tol. (Spectral methods
    need a looser tol: SVDs of nearly degenerate spectra differ across processes at the
    1e-5 level, as BLAS blocking follows the thread count.)"""
    got = load_file(path)
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        err = float((got[k].double() - v.double()).norm() / max(float(v.double().norm()), 1e-30))
        assert err <= tol, (k, err)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- merge


def test_merge_ta_sb_safetensors_with_metadata(data, tmp_path):
    r = data["root"]
    out = tmp_path / "ta_sb.safetensors"
    proc = run("merge", "--base", r / "base.safetensors", "--experts", *[r / f"{t}.safetensors" for t in TASKS[:3]],
               "--method", "ta", "--boost", "0", "--alpha", "0.3", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and proc.stderr == ""
    assert_model(out, expected_model(data, TASKS[:3], "ta", alpha=0.3, boost=0.0))
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["subboost.method"] == "ta" and float(meta["subboost.alpha"]) == 0.3
    assert float(meta["subboost.boost_beta"]) == 0.0
    inputs = json.loads(meta["subboost.inputs"])
    assert [i["role"] for i in inputs] == ["base", "expert", "expert", "expert"]
    assert [i["name"] for i in inputs[1:]] == TASKS[:3]
    assert inputs[0]["sha256"] == sha256(r / "base.safetensors")
    assert inputs[2]["sha256"] == sha256(r / "DTD.safetensors")


@pytest.mark.parametrize("method,params", [("ties", ["top_k=0.2"]), ("consensus", ["k=2", "lambdas=0.4"]), ("iso-c", []), ("tsv", [])])
def test_merge_methods_from_pt_state_dicts(data, tmp_path, method, params):
    r = data["root"]
    out = tmp_path / f"{method}.safetensors"
    args = ["merge", "--base", r / "base.pt", "--experts", *[r / f"{t}.pt" for t in TASKS], "--method", method,
            "--alpha", "0.7", "--boost", "0.0", "--output", out]
    for p in params:
        args += ["--param", p]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    parsed = {p.split("=")[0]: json.loads(p.split("=")[1]) for p in params}
    tol = 1e-6 if method in ("ties", "consensus") else 2e-4
    assert_model(out, expected_model(data, TASKS, method, alpha=0.7, boost=0.0, params=parsed), tol)
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["subboost.params"]) == parsed


def test_merge_lines_and_mixed_input_formats(data, tmp_path):
    r = data["root"]
    out = tmp_path / "lines.safetensors"
    proc = run("merge", "--base", r / "base.safetensors", "--experts", r / "Cars.pt", r / "DTD.safetensors",
               "--boost", "0", "--lines", "0.5", "--output", out, "--no-hash")
    assert proc.returncode == 0, proc.stderr
    assert "lines b=0.5" in proc.stdout
    assert_model(out, expected_model(data, ["Cars", "DTD"], "ta", alpha=1.0, boost=0.0, lines_b=0.5))


def test_merge_attention_treatment_and_lines_order(data, tmp_path):
    r = data["root"]
    out = tmp_path / "heads.safetensors"
    proc = run("merge", "--base", r / "base.safetensors", "--experts", r / "Cars.safetensors", r / "DTD.safetensors",
               "--boost", "0", "--attention", "heads", "--num-heads", "4", "--lines", "0.5",
               "--lines-order", "before_boost", "--output", out, "--no-hash")
    assert proc.returncode == 0, proc.stderr
    assert_model(out, expected_model(data, ["Cars", "DTD"], "ta", alpha=1.0, boost=0.0, lines_b=0.5,
                                     lines_order="before_boost",
                                     boost_options={"attention": "heads", "num_heads": 4}))
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["subboost.boost_options"])["attention"] == "heads"
    assert meta["subboost.lines_order"] == "before_boost"
    bad = run("merge", "--base", r / "base.safetensors", "--experts", r / "Cars.safetensors", "--boost", "0",
              "--attention", "heads", "--output", tmp_path / "x.safetensors")
    assert_bad_input(bad, "--num-heads")
    bad = run("merge", "--base", r / "base.safetensors", "--experts", r / "Cars.safetensors", "--boost", "0",
              "--attention", "heads", "--num-heads", "5", "--output", tmp_path / "x.safetensors")
    assert_bad_input(bad, "num_heads=5")
    assert not (tmp_path / "x.safetensors").exists()


def test_merge_from_checkpoint_root_with_pickled_modules(tmp_path):
    """Public layout {root}/{model}/{Task}Val/nonlinear_finetuned.pt with pickled modules whose
    class code (src.modeling) is not installed: needs --allow-pickle, then merges."""
    folder = tmp_path / "ckpt" / "ViT-B-32"
    for i, task in enumerate(["MNIST", "Cars", "DTD"]):
        (folder / f"{task}Val").mkdir(parents=True)
        write_pickled_module(folder / f"{task}Val" / "nonlinear_finetuned.pt", seed=10 + i)
    write_pickled_module(folder / "MNISTVal" / "nonlinear_zeroshot.pt", seed=0)
    out = tmp_path / "root.safetensors"
    args = ["merge", "--root", tmp_path / "ckpt", "--model", "ViT-B-32", "--tasks", "Cars", "DTD",
            "--method", "ta", "--boost", "0", "--alpha", "0.5", "--output", out]
    assert_bad_input(run(*args), "--allow-pickle", "nonlinear_zeroshot.pt")
    assert not out.exists()
    proc = run(*args, "--allow-pickle")
    assert proc.returncode == 0, proc.stderr
    def stripped(path: Path) -> dict:  # the one key rule: the wrapper's "model." prefix goes
        return {k.removeprefix("model."): v for k, v in torch.load(path, weights_only=True).items()}

    sd = {n: stripped(folder / f"{n}Val" / "nonlinear_finetuned.pt.sd.pt") for n in ("Cars", "DTD")}
    base = stripped(folder / "MNISTVal" / "nonlinear_zeroshot.pt.sd.pt")
    vectors = list(task_vectors(base, sd).values())
    expected = apply_task_vector(base, merge(vectors, "ta", boost_beta=0.0), 0.5)
    assert_model(out, expected)
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["subboost.experts"]) == ["Cars", "DTD"]


def test_merge_from_old_layout(data, tmp_path):
    folder = tmp_path / "old" / "ViT-B-32"
    folder.mkdir(parents=True)
    shutil.copy(data["root"] / "base.pt", folder / "zeroshot.pt")
    for t in TASKS[:2]:
        (folder / t).mkdir()
        shutil.copy(data["root"] / f"{t}.pt", folder / t / "finetuned.pt")
    out = tmp_path / "old.safetensors"
    proc = run("merge", "--root", tmp_path / "old", "--model", "ViT-B-32", "--tasks", *TASKS[:2], "--output", out,
               "--method", "average")
    assert proc.returncode == 0, proc.stderr
    assert_model(out, expected_model(data, TASKS[:2], "average", alpha=1.0))


def test_overwrite_flag_and_python_module_entry(data, tmp_path):
    r = data["root"]
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    args = ["merge", "--base", r / "base.safetensors", "--experts", r / "Cars.safetensors", "--output", out]
    assert_bad_input(run(*args), "exists", "--overwrite")
    assert out.read_bytes() == b"old"
    proc = run(*args, "--overwrite", module=True)
    assert proc.returncode == 0, proc.stderr
    assert_model(out, expected_model(data, ["Cars"], "ta", alpha=1.0))


# ----------------------------------------------------------------------------- bad input


def _bad_file(data: dict, tmp_path: Path, name: str, edit) -> Path:
    sd = {k: v.clone() for k, v in data["experts"]["Cars"].items()}
    edit(sd)
    path = tmp_path / name
    save_file(sd, path)
    return path


def test_bad_inputs_exit_2_with_one_line_and_no_output(data, tmp_path):
    r = data["root"]
    out = tmp_path / "out.safetensors"
    good = [r / "Cars.safetensors", r / "DTD.safetensors"]

    def nan(sd):
        sd["visual.transformer.resblocks.1.attn.out_proj.weight"][0, 0] = float("inf")

    def drop(sd):
        del sd["visual.ln_post.bias"]

    def reshape(sd):
        sd["visual.proj"] = torch.zeros(32, 8)

    cases = [
        (["--experts", r / "nope.safetensors", *good], ["not found", "nope.safetensors"]),
        (["--experts", *good, _bad_file(data, tmp_path, "nan.safetensors", nan)],
         ["nan.safetensors", "resblocks.1.attn.out_proj.weight", "NaN or Inf"]),
        (["--experts", *good, _bad_file(data, tmp_path, "drop.safetensors", drop)], ["keys differ", "visual.ln_post.bias"]),
        (["--experts", *good, _bad_file(data, tmp_path, "shape.safetensors", reshape)], ["shape mismatch", "visual.proj"]),
        (["--experts", *good, "--method", "magic"], ["unknown merging method 'magic'", "ties"]),
        (["--experts", *good, "--method", "ties", "--param", "topk=0.2"], ["no parameter 'topk'", "top_k"]),
        (["--experts", *good, "--method", "ties", "--param", "top_k=2"], ["top_k"]),
        (["--experts", *good, "--boost", "1.5"], ["--boost", "[0, 1]"]),
        (["--experts", *good, "--alpha", "inf"], ["--alpha", "finite"]),
        (["--experts", *good, "--output", tmp_path / "x.pt"], [".safetensors"]),
        (["--experts", r / "base.pt"], ["missing --base"]),
    ]
    for extra, needles in cases:
        args = ["merge"] + ([] if "missing --base" in needles else ["--base", r / "base.safetensors"]) + extra
        if "--output" not in extra:
            args += ["--output", out]
        proc = run(*args)
        assert_bad_input(proc, *needles)
        assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".safetensors") or p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_output_equal_to_an_input_is_refused_even_with_overwrite(data, tmp_path):
    copy = tmp_path / "Cars.safetensors"
    shutil.copy(data["root"] / "Cars.safetensors", copy)
    before = sha256(copy)
    for extra in ([], ["--overwrite"]):
        proc = run("merge", "--base", data["root"] / "base.safetensors", "--experts", copy, data["root"] / "DTD.safetensors",
                   "--output", copy, *extra)
        assert_bad_input(proc, "is an input", "Cars.safetensors")
    assert sha256(copy) == before


def test_help_has_examples_for_every_command():
    top = run("--help")
    assert top.returncode == 0 and "merge" in top.stdout and "diagnose" in top.stdout and "select" in top.stdout
    for command in ("merge", "diagnose", "select"):
        proc = run(command, "--help")
        assert proc.returncode == 0
        assert "examples:" in proc.stdout and f"subboost {command}" in proc.stdout
    assert "ties" in run("merge", "--help").stdout


# ----------------------------------------------------------------------------- diagnose / select


def test_diagnose_formats_and_plot(data, tmp_path):
    r = data["root"]
    args = ["diagnose", "--base", r / "base.safetensors", "--experts", *[r / f"{t}.safetensors" for t in TASKS],
            "--method", "ties", "--param", "top_k=0.3", "--boost", "0.0"]
    csv_path, png = tmp_path / "ranks.csv", tmp_path / "ranks.png"
    proc = run(*args, "--format", "csv", "--output", csv_path, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(csv_path)
    assert set(table.variant) == {"ta", "ta+sb", "ties", "ties+sb"}
    assert len(table) == 4 * 8  # 2 visual blocks × 4 matrices; the frozen text tower is skipped
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    vectors = list(task_vectors(data["base"], data["experts"]).values())
    ta = merge(vectors, "ta")
    for variant, delta in (("ta", ta), ("ta+sb", boost_task_vector(ta, 0.0)),
                           ("ties+sb", merge(vectors, "ties", top_k=0.3, boost_beta=0.0))):
        ref = rank_table(delta).set_index("key")
        got = table[table.variant == variant].set_index("key")
        assert sorted(got.index) == sorted(ref.index)
        for col in ("stable_rank", "energy_rank_50", "energy_rank_30"):
            assert (got[col] - ref.loc[got.index, col]).abs().max() < 1e-3 * max(1.0, ref[col].abs().max()), (variant, col)
    js = run(*args, "--format", "json")
    assert js.returncode == 0, js.stderr
    payload = json.loads(js.stdout)
    assert payload["method"] == "ties" and len(payload["rows"]) == len(table)
    tab = run(*args)
    assert tab.returncode == 0 and "mean over block matrices" in tab.stdout and "ties+sb" in tab.stdout


def test_select_json_and_heatmap(data, tmp_path):
    r = data["root"]
    js, png = tmp_path / "sel.json", tmp_path / "align.png"
    proc = run("select", "--base", r / "base.safetensors", "--experts", *[r / f"{t}.safetensors" for t in TASKS],
               "--pool", "Cars", "--k", "2", "--output", js, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(js.read_text())
    assert result["experts"] == TASKS and result["pool"] == ["Cars"]
    assert len(result["selected"]) == 2 and set(result["selected"]) <= {"DTD", "EuroSAT", "GTSRB"}
    a = torch.tensor(result["alignment"], dtype=torch.float64)
    assert a.shape == (4, 4) and torch.allclose(a, a.T) and torch.all(a.diagonal() == 0)
    assert png.read_bytes()[:4] == b"\x89PNG"
    from subboost.hogsvd import alignment_matrix, select_experts

    vectors = task_vectors(data["base"], data["experts"])
    ref = alignment_matrix(vectors)
    assert torch.allclose(a, torch.tensor(ref.matrix.to_numpy()), rtol=1e-6, atol=1e-9)
    assert result["selected"] == select_experts(ref, ["Cars"], ["DTD", "EuroSAT", "GTSRB"], 2).selected
    bad = run("select", "--base", r / "base.safetensors", "--experts", *[r / f"{t}.safetensors" for t in TASKS],
              "--pool", "Flowers", "--k", "2")
    assert_bad_input(bad, "Flowers")
    too_many = run("select", "--base", r / "base.safetensors", "--experts", *[r / f"{t}.safetensors" for t in TASKS],
                   "--pool", "Cars", "--k", "9")
    assert_bad_input(too_many, "--k 9")


def test_device_cuda_unavailable_is_bad_input(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = data["root"]
    proc = run("merge", "--base", r / "base.safetensors", "--experts", r / "Cars.safetensors", "--device", "cuda",
               "--output", tmp_path / "c.safetensors")
    assert_bad_input(proc, "CUDA")
    assert not os.path.exists(tmp_path / "c.safetensors")


# ----------------------------------------------------------------------------- hostile inputs
# In-process runs of the entry point (``main(argv)``) where no subprocess is needed: the
# exit code, exactly one line on stderr, and what is left on disk.


def main_run(capsys, *args: object) -> tuple[int, str, str]:
    from subboost.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _hidden_or_temp(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def test_non_finite_merged_result_exit_2_naming_the_key(capsys, tmp_path):
    """float16 experts whose summed update exceeds 65504, and α = 1e300 on float32: the
    result is checked before it is published."""
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    base = {key: torch.zeros(8, 4, dtype=torch.float16), "visual.ln_post.bias": torch.zeros(4, dtype=torch.float16)}
    for i in range(3):
        e = {k: v.clone() for k, v in base.items()}
        e[key].fill_(30000.0)  # each finite; the sum of the three updates is 90000 > 65504
        save_file(e, tmp_path / f"h{i}.safetensors")
    save_file(base, tmp_path / "b16.safetensors")
    out = tmp_path / "inf.safetensors"
    code, _, err = main_run(capsys, "merge", "--base", tmp_path / "b16.safetensors", "--experts",
                            *[tmp_path / f"h{i}.safetensors" for i in range(3)], "--output", out)
    assert_one_line_error(code, err, key, "not finite")
    assert not out.exists()
    base32 = {key: torch.zeros(8, 4)}
    e32 = {key: torch.full((8, 4), 0.5)}
    save_file(base32, tmp_path / "b32.safetensors")
    save_file(e32, tmp_path / "e32.safetensors")
    code, _, err = main_run(capsys, "merge", "--base", tmp_path / "b32.safetensors", "--experts", tmp_path / "e32.safetensors",
                            "--alpha", "1e300", "--output", out)
    assert_one_line_error(code, err, key, "not finite")
    assert not out.exists() and _hidden_or_temp(tmp_path) == []


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def hostile_safetensors(folder: Path, like: dict) -> dict[str, Path]:
    """Crafted files with the keys of ``like`` (a valid state dict) except for one bad entry."""
    import struct

    def header_of(sd: dict) -> tuple[dict, bytes]:
        h, off, blob = {}, 0, b""
        for k, v in sd.items():
            b = v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b""
            names = {torch.float32: "F32", torch.int64: "I64"}
            h[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
            off += len(b)
            blob += b
        return h, blob

    h, blob = header_of(like)
    key = "visual.proj"
    out = {}
    neg = json.loads(json.dumps(h))
    neg[key]["data_offsets"] = [-64, neg[key]["data_offsets"][1] - neg[key]["data_offsets"][0] - 64]
    out["negative_offsets"] = _raw_safetensors(folder / "negoff.safetensors", neg, blob)
    over = json.loads(json.dumps(h))
    first = next(iter(over))
    over[key]["data_offsets"] = list(over[first]["data_offsets"])
    over[key]["shape"] = list(over[first]["shape"])
    out["overlapping"] = _raw_safetensors(folder / "overlap.safetensors", over, blob)
    negshape = json.loads(json.dumps(h))
    negshape[key]["shape"] = [-negshape[key]["shape"][0], negshape[key]["shape"][1]]
    out["negative_shape"] = _raw_safetensors(folder / "negshape.safetensors", negshape, blob)
    baddtype = json.loads(json.dumps(h))
    baddtype[key]["dtype"] = "Q4"
    out["bad_dtype"] = _raw_safetensors(folder / "q4.safetensors", baddtype, blob)
    meta = json.loads(json.dumps(h))
    meta["__metadata__"] = [["format", "pt"]]
    out["malformed_metadata"] = _raw_safetensors(folder / "badmeta.safetensors", meta, blob)
    meta2 = json.loads(json.dumps(h))
    meta2["__metadata__"] = {"format": 1}
    out["metadata_not_strings"] = _raw_safetensors(folder / "badmeta2.safetensors", meta2, blob)
    out["truncated"] = _raw_safetensors(folder / "short.safetensors", h, blob[: len(blob) // 2])
    (folder / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    out["huge_header"] = folder / "huge.safetensors"
    (folder / "empty.safetensors").write_bytes(b"")
    out["empty"] = folder / "empty.safetensors"
    if hasattr(torch, "float8_e4m3fn"):
        fp8 = dict(like)
        fp8[key] = like[key].to(torch.float8_e4m3fn)
        save_file(fp8, folder / "fp8.safetensors")
        out["fp8"] = folder / "fp8.safetensors"
    return out


def test_crafted_safetensors_exit_2_naming_the_file(data, capsys, tmp_path):
    r = data["root"]
    for case, path in hostile_safetensors(tmp_path, data["experts"]["Cars"]).items():
        out = tmp_path / "out.safetensors"
        code, _, err = main_run(capsys, "merge", "--base", r / "base.safetensors", "--experts", r / "DTD.safetensors",
                                path, "--output", out)
        line = assert_one_line_error(code, err, str(path))
        assert not out.exists(), case
        if case == "fp8":
            assert "visual.proj" in line and "F8_E4M3" in line
    assert _hidden_or_temp(tmp_path) == []


def test_torch_files_with_sparse_or_non_tensor_entries(data, capsys, tmp_path):
    r = data["root"]
    base = data["base"]
    cases = {
        "sparse": ({**data["experts"]["Cars"], "visual.proj": data["experts"]["Cars"]["visual.proj"].to_sparse()}, "visual.proj"),
        "list": ({**data["experts"]["Cars"], "extra_list": [1, 2, 3]}, "extra_list"),
        "complex": ({**data["experts"]["Cars"], "visual.proj": data["experts"]["Cars"]["visual.proj"].to(torch.complex64)}, "visual.proj"),
    }
    for name, (sd, key) in cases.items():
        torch.save(sd, tmp_path / f"{name}.pt")
        code, _, err = main_run(capsys, "merge", "--base", r / "base.safetensors", "--experts", tmp_path / f"{name}.pt",
                                "--output", tmp_path / "o.safetensors")
        assert_one_line_error(code, err, f"{name}.pt", key)
    # stray metadata scalars beside the tensors (model_name, epoch) are ignored: same result as without
    torch.save({**data["experts"]["Cars"], "model_name": "ViT-B-32", "epoch": 3}, tmp_path / "meta.pt")
    code, _, err = main_run(capsys, "merge", "--base", r / "base.safetensors", "--experts", tmp_path / "meta.pt",
                            "--output", tmp_path / "m.safetensors", "--no-hash")
    assert code == 0, err
    assert_model(tmp_path / "m.safetensors", apply_task_vector(base, merge(list(task_vectors(base, {"c": data["experts"]["Cars"]}).values()), "ta"), 1.0))


def test_protocol_4_pickle_gives_one_line_without_warnings(data, capsys, tmp_path):
    import pickle

    with open(tmp_path / "p4.pt", "wb") as fh:
        pickle.dump(dict(data["experts"]["Cars"]), fh, protocol=4)
    proc = run("merge", "--base", data["root"] / "base.safetensors", "--experts", tmp_path / "p4.pt",
               "--output", tmp_path / "o.safetensors")
    assert_bad_input(proc, "p4.pt", "cannot read as a torch checkpoint")
    assert "Warning" not in proc.stderr


EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"visual.proj": torch.zeros(2, 2), "payload": Evil()}, sys.argv[1])
"""


def test_malicious_pickle_never_runs_even_with_allow_pickle(data, capsys, tmp_path):
    script = tmp_path / "evil.py"
    script.write_text(EVIL)
    marker = tmp_path / "PWNED"
    subprocess.run([sys.executable, str(script), str(tmp_path / "evil.pt"), str(marker)], check=True)
    for extra in ([], ["--allow-pickle"]):
        code, _, err = main_run(capsys, "merge", "--base", data["root"] / "base.safetensors", "--experts",
                                tmp_path / "evil.pt", "--output", tmp_path / "o.safetensors", *extra)
        assert_one_line_error(code, err, "evil.pt")
        assert not marker.exists()
    assert "system" in err  # the refused global is named


def _slow_merge_args(tmp_path: Path) -> list:
    """A merge that takes a few seconds: one large non-block tensor, merged one row per block."""
    big = {"visual.ln_post.bias": torch.zeros(4), "token_embedding.weight": torch.zeros(60000, 16)}
    save_file(big, tmp_path / "big_base.safetensors")
    for i in range(2):
        save_file({k: v + i + 1 for k, v in big.items()}, tmp_path / f"big{i}.safetensors")
    return ["merge", "--base", tmp_path / "big_base.safetensors", "--experts",
            *[tmp_path / f"big{i}.safetensors" for i in range(2)], "--memory-budget", "0", "--no-hash"]


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signals_remove_the_temporary_file_and_keep_the_old_output(tmp_path, signame, code):
    import signal
    import time

    args = _slow_merge_args(tmp_path)
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"previous result")
    proc = subprocess.Popen(ENTRY + [str(a) for a in args + ["--output", out, "--overwrite"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while not list(out.parent.glob(".merged.safetensors.*.tmp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.safetensors"]
    assert out.read_bytes() == b"previous result"


def test_concurrent_merges_to_one_new_name_exactly_one_wins(tmp_path):
    args = _slow_merge_args(tmp_path)
    out = tmp_path / "race.safetensors"
    procs = [subprocess.Popen(ENTRY + [str(a) for a in args + ["--output", out]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(e for c, e in results if c == 2)
    assert "exists" in loser and str(out) in loser
    assert _hidden_or_temp(tmp_path) == []
    assert load_file(out)["token_embedding.weight"].shape == (60000, 16)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_respect_the_umask(data, capsys, tmp_path, umask):
    r = data["root"]
    old = os.umask(umask)
    try:
        out = tmp_path / "u.safetensors"
        code, _, err = main_run(capsys, "merge", "--base", r / "base.safetensors", "--experts", r / "Cars.safetensors",
                                "--output", out, "--no-hash")
        js = tmp_path / "sel.json"
        code2, _, err2 = main_run(capsys, "select", "--base", r / "base.safetensors", "--experts",
                                  *[r / f"{t}.safetensors" for t in TASKS[:3]], "--pool", "Cars", "--k", "1",
                                  "--output", js)
    finally:
        os.umask(old)
    assert code == 0 and code2 == 0, (err, err2)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert js.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failures_leave_nothing_behind(data, capsys, tmp_path):
    r = data["root"]
    experts = [r / f"{t}.safetensors" for t in TASKS[:2]]
    for command in ("diagnose", "select"):
        extra = ["--k", "1", "--pool", "Cars"] if command == "select" else []
        out = tmp_path / f"{command}.json"
        code, _, err = main_run(capsys, command, "--base", r / "base.safetensors", "--experts", *experts, *extra,
                                "--output", out, "--plot", tmp_path / "figure.xyz")
        assert_one_line_error(code, err, "--plot", "xyz")
        assert not out.exists()
        same = tmp_path / "r.png"
        code, _, err = main_run(capsys, command, "--base", r / "base.safetensors", "--experts", *experts, *extra,
                                "--output", same, "--plot", same)
        assert_one_line_error(code, err, "--output", "--plot")
        assert not same.exists()
    # a failed merge into new nested folders removes the folders it created
    nan = {k: v.clone() for k, v in data["experts"]["Cars"].items()}
    nan["visual.proj"][0, 0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    nested = tmp_path / "new" / "deeper" / "m.safetensors"
    code, _, err = main_run(capsys, "merge", "--base", r / "base.safetensors", "--experts", r / "DTD.safetensors",
                            tmp_path / "nan.safetensors", "--output", nested)
    assert_one_line_error(code, err, "nan.safetensors", "visual.proj")
    assert not (tmp_path / "new").exists()
    assert _hidden_or_temp(tmp_path) == []


def test_tracebacks_become_exit_2(data, capsys, tmp_path):
    r = data["root"]
    code, _, err = main_run(capsys, "diagnose", "--base", r / "base.safetensors", "--experts", r / "base.pt")
    assert_one_line_error(code, err, "zero")
    base = ["merge", "--base", r / "base.safetensors", "--experts", *[r / f"{t}.safetensors" for t in TASKS[:2]],
            "--output", tmp_path / "o.safetensors"]
    for method, param, needles in [
        ("ties", "top_k=[1,2]", ["top_k", "[1, 2]"]),
        ("ties", "top_k=null", ["top_k", "None"]),
        ("ties", "top_k=abc", ["top_k", "'abc'"]),
        ("ties", "top_k=true", ["top_k"]),
        ("consensus", "k=abc", ["parameter 'k'", "'abc'"]),
        ("consensus", "k=0", ["parameter 'k'"]),
        ("consensus", "lambdas=[]", ["lambdas"]),
        ("consensus", "base=magic", ["base", "magic"]),
        ("iso-cts", "common_fraction=2", ["common_fraction"]),
        ("ho-sb", "pi=-1", ["pi"]),
        ("tsv", "layer_types=[\"conv\"]", ["layer_types"]),
    ]:
        code, _, err = main_run(capsys, *base, "--method", method, "--param", param)
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o.safetensors").exists()


def test_unwritable_outputs_are_named_not_the_temporary_file(data, capsys, tmp_path):
    r = data["root"]
    targets = [Path("/proc/subboost-test/merged.safetensors"), Path("/proc/merged.safetensors")]
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        targets.append(ro / "merged.safetensors")
    for target in targets:
        code, _, err = main_run(capsys, "merge", "--base", r / "base.safetensors", "--experts", r / "Cars.safetensors",
                                "--output", target, "--no-hash")
        line = assert_one_line_error(code, err, "--output", str(target))
        assert ".tmp" not in line


def test_python_dash_m_subboost_is_the_command(data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "subboost", "--version"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0 and proc.stdout.startswith("subboost ")
    bad = subprocess.run([sys.executable, "-m", "subboost", "merge", "--base", data["root"] / "nope.safetensors",
                          "--experts", data["root"] / "Cars.safetensors", "--output", tmp_path / "o.safetensors"],
                         capture_output=True, text=True, env=ENV)
    assert_bad_input(bad, "not found", "nope.safetensors")


def test_root_without_base_takes_base_file_with_text_tower(tmp_path):
    """The public 20-task release ships experts (``model.*``, no text transformer) and no base:
    without --base the one error line says so and how to provide one; a base saved from
    open_clip (no prefix, text tower included) is accepted, the text tower kept as it is."""
    base = clip_state_dict()
    root = tmp_path / "release"
    experts = {}
    for i, task in enumerate(("Cars", "DTD")):
        full = expert_state_dict(base, seed=i)
        experts[task] = {k: v for k, v in full.items() if not k.startswith("transformer.")}  # as ImageEncoder
        folder = root / "ViT-Tiny" / f"{task}Val"
        folder.mkdir(parents=True)
        torch.save({f"model.{k}": v for k, v in experts[task].items()}, folder / "nonlinear_finetuned.pt")
    out = tmp_path / "merged.safetensors"
    proc = run("merge", "--root", root, "--model", "ViT-Tiny", "--tasks", "Cars", "DTD", "--method", "ta",
               "--alpha", "0.5", "--output", out)
    assert_bad_input(proc, "no zero-shot base", "--base")
    assert not out.exists()
    torch.save(base, tmp_path / "openclip_base.pt")
    proc = run("merge", "--root", root, "--model", "ViT-Tiny", "--tasks", "Cars", "DTD", "--method", "ta",
               "--alpha", "0.5", "--base", tmp_path / "openclip_base.pt", "--output", out)
    assert proc.returncode == 0, proc.stderr
    merged = load_file(out)
    assert set(merged) == {k for k, v in base.items()}
    for key, value in base.items():
        if key in experts["Cars"] and value.is_floating_point():
            want = value.double() + 0.5 * sum(experts[t][key].double() - value.double() for t in experts)
            assert torch.allclose(merged[key].double(), want, atol=1e-6), key
        else:
            assert torch.equal(merged[key], value), key
