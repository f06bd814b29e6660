"""The installed ``subboost`` command (issue 7), driven as a subprocess on tiny synthetic
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
    sd = {n: torch.load(folder / f"{n}Val" / "nonlinear_finetuned.pt.sd.pt", weights_only=True) for n in ("Cars", "DTD")}
    base = torch.load(folder / "MNISTVal" / "nonlinear_zeroshot.pt.sd.pt", weights_only=True)
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
