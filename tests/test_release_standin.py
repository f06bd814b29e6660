"""The public releases, end to end, on a stand-in written with the authors' save semantics
(tests/standin_release.py): converter, library suite, class mapping, the checks made before any
work starts, and (slow) one smoke chapter in both layouts."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from standin_release import CONFIG, MODEL, TASKS, write_authors_data, write_standin  # noqa: E402

from subboost import release  # noqa: E402
from subboost.io import Placeholder, restricted_pickle_module  # noqa: E402
from subboost.convert import authors_val_indices, convert, image_folder, main  # noqa: E402
from subboost.evaluate import best_alpha  # noqa: E402
from subboost.merging import merge  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Both layouts written once, and each converted into a new root (tall_masks with the
    user-supplied base, as the public release has none)."""
    out = {}
    for layout in ("tall_masks", "task_vectors"):
        where = tmp_path_factory.mktemp(layout)
        s = write_standin(where, layout)
        converted = where / "converted"
        convert(converted, checkpoints=s.root, model=MODEL, base=s.base_file, allow_pickle=True, data=s.authors_data)
        out[layout] = (s, converted)
    return out


# ------------------------------------------------------------------ the stand-in itself


def test_authors_code_is_gone_and_files_are_pickles(standins):
    s, _ = standins["task_vectors"]
    with pytest.raises(ModuleNotFoundError):
        __import__("src.modeling")
    raw = torch.load(s.root / MODEL / "head_DTD.pt", weights_only=False,
                     pickle_module=restricted_pickle_module())
    assert isinstance(raw, Placeholder)
    assert type(raw).__module__ == "src.modeling" and type(raw).__name__ == "ClassificationHead"
    tm, _ = standins["tall_masks"]
    state = torch.load(tm.root / MODEL / "DTDVal" / "nonlinear_finetuned.pt", weights_only=True)
    assert all(k.startswith("model.") for k in state) and not any(k.startswith("model.transformer.") for k in state)
    assert not list((tm.root / MODEL).glob("*/nonlinear_zeroshot.*"))  # as the public 20-task release


# ------------------------------------------------------------------ converter


def test_converted_tensors_are_the_release_tensors(standins):
    for layout, (s, converted) in standins.items():
        for task in s.tasks:
            raw = release.load_state_dict(release.expert_path(s.root, MODEL, task, layout), allow_pickle=True)
            new_path = release.expert_path(converted, MODEL, task, layout)
            assert new_path.suffix == ".safetensors"
            new = release.load_state_dict(new_path)
            assert set(raw) == set(new) and all(torch.equal(raw[k], new[k]) for k in raw)
            w_raw = release.load_head_weight(release.head_path(s.root, MODEL, task), allow_pickle=True)
            w_new = release.load_head_weight(converted / MODEL / release.head_path(s.root, MODEL, task)
                                             .relative_to(s.root / MODEL).with_suffix(".safetensors"))
            assert torch.equal(w_raw, w_new)
    tm, converted = standins["tall_masks"]
    base = release.load_state_dict(release.base_path(converted, MODEL, "tall_masks"))
    supplied = torch.load(tm.base_file, weights_only=True)
    assert all(torch.equal(base[k], supplied[k]) for k in base)
    assert not any(k.startswith("transformer.") for k in base)  # restricted to the experts' keys


def test_authors_val_split_is_torch_random_split():
    """Independent reference: torch's own random_split over the ImageFolder order."""
    for n in (37, 1000):
        _, val = torch.utils.data.random_split(range(n), [n - int(0.1 * n), int(0.1 * n)],
                                               generator=torch.Generator().manual_seed(0))
        assert authors_val_indices(n) == list(val.indices)
    assert len(authors_val_indices(60000)) == 5000  # capped like the authors' max_val_samples


def test_converted_data_follow_the_authors_folders(standins):
    s, converted = standins["tall_masks"]
    classes, samples = image_folder(s.authors_data / "dtd" / "train")
    assert classes == TASKS["DTD"][3]
    val_files = {p.name for p in (converted / "data" / "DTD" / "val").rglob("*.png")}
    expected = {samples[i][0].name for i in authors_val_indices(len(samples))}
    assert val_files == expected and len(val_files) == int(0.1 * len(samples))
    assert (converted / "data" / "DTD" / "classes.txt").read_text().split() == TASKS["DTD"][3]
    # EuroSAT: the authors read its own val folder, the test split is EuroSAT_splits/test
    assert len(list((converted / "data" / "EuroSAT" / "val").rglob("*.png"))) == 2 * 3
    assert len(list((converted / "data" / "EuroSAT" / "test").rglob("*.png"))) == 3 * 3


def test_convert_never_in_place_and_names_the_missing_base(standins, tmp_path, capsys):
    s, converted = standins["tall_masks"]
    before = sorted(p.name for p in converted.rglob("*"))
    assert main(["convert", "--out", str(converted), "--data", str(s.authors_data)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in converted.rglob("*")) == before
    assert main(["convert", "--out", str(s.root / "inside"), "--checkpoints", str(s.root), "--model", MODEL]) == 2
    assert "in place" in capsys.readouterr().err
    dest = tmp_path / "new"
    assert main(["convert", "--out", str(dest), "--checkpoints", str(s.root), "--model", MODEL, "--allow-pickle"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no zero-shot base" in lines[0] and "--base" in lines[0]
    assert not dest.exists() and not list(tmp_path.glob(".new.*"))  # nothing half-written is left
    assert main(["convert", "--out", str(dest), "--checkpoints", str(s.root), "--model", MODEL,
                 "--base", str(s.base_file)]) == 2
    assert "allow_pickle" in capsys.readouterr().err


def test_convert_help():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "subboost.release", "convert", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--base" in out.stdout and "5000" in out.stdout


# ------------------------------------------------------------------ the library suite


@pytest.mark.parametrize("layout", ["tall_masks", "task_vectors"])
def test_library_suite_on_the_standin(standins, layout):
    _, converted = standins[layout]
    suite = release.load_suite(converted, MODEL, device="cpu")
    assert suite.info["layout"] == layout and suite.task_names == ["DTD", "EuroSAT", "SUN397"]
    for t in suite.task_names:  # the heads are built from the experts: a correct loader scores 1
        assert suite.finetuned_accuracy(t, "test") == 1.0 and suite.finetuned_accuracy(t, "val") == 1.0
    from subboost.evaluate import tune_and_test

    alpha, test, sweep = tune_and_test(suite, merge(suite.task_vectors(), "ta", boost_beta=0.0), alphas=[0.1, 0.5])
    assert alpha in (0.1, 0.5) and len(test) == 3 and test.accuracy.between(0, 1).all()


def test_raw_task_vectors_release_loads_with_allow_pickle(standins):
    s, converted = standins["task_vectors"]
    suite = release.load_suite(s.root, MODEL, data_root=converted / "data", allow_pickle=True, device="cpu")
    ref = release.load_suite(converted, MODEL, device="cpu")
    for k, v in ref.base_state.items():
        assert torch.equal(suite.base_state[k], v)
    assert suite.finetuned_accuracy("SUN397") == 1.0


# ------------------------------------------------------------------ defect: chapters cannot opt into pickles


def test_chapters_declare_allow_pickle_and_tasks():
    from subboost.book import NOTEBOOKS_DIR, _check_overrides, declared_parameters, discover_chapters, load_chapter

    chapters = [c for c in discover_chapters(NOTEBOOKS_DIR) if c.name[:2] in ("01", "03", "04")]
    assert len(chapters) == 3
    _check_overrides(chapters, {"allow_pickle": True, "tasks": ["DTD", "EuroSAT"], "checkpoint_root": "/x"})
    for ch in chapters:
        declared = declared_parameters(load_chapter(ch), ch.name)
        assert declared["allow_pickle"] is False and declared["tasks"] is None
        assert '"allow_pickle": allow_pickle' in ch.source.read_text()  # and the chapter passes it on


def test_parameters_reach_the_suite(standins):
    from subboost.experiments import load_suite_from_parameters

    s, converted = standins["task_vectors"]
    params = {"checkpoint_root": str(s.root), "model": MODEL, "data_root": str(converted / "data"),
              "device": "cpu", "tasks": ["SUN397", "DTD"], "allow_pickle": True}
    assert load_suite_from_parameters(params).task_names == ["SUN397", "DTD"]
    with pytest.raises(ValueError, match="allow_pickle"):
        load_suite_from_parameters({**params, "allow_pickle": "yes"})


def test_pickled_head_fails_before_any_work(standins):
    """Without allow_pickle the suite is refused at load time, naming the head, not 500 s later."""
    s, converted = standins["task_vectors"]
    root = s.root.parent / "mixed"
    if not root.exists():  # a converted release with one head as the raw pickle
        shutil.copytree(converted, root)
        (root / MODEL / "head_SUN397.safetensors").unlink()
        shutil.copy(s.root / MODEL / "head_SUN397.pt", root / MODEL / "head_SUN397.pt")
    with pytest.raises(ValueError, match=r"head of task 'SUN397'.*allow_pickle=True"):
        release.load_suite(root, MODEL, device="cpu")
    assert release.load_suite(root, MODEL, device="cpu", allow_pickle=True).num_classes("SUN397") == 5


# ------------------------------------------------------------------ defect: ImageFolder labels


def _png_tree(root: Path, layout: dict[str, list[str]], size: int = 8) -> None:
    from PIL import Image

    for split, classes in layout.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            Image.new("RGB", (size, size), (int(c) * 20 % 256 if c.isdigit() else 7, 0, 0)).save(d / "x.png")


def test_one_class_mapping_for_all_splits(tmp_path):
    # integer folder names are the rows themselves, whatever a split holds
    _png_tree(tmp_path / "G", {"val": ["03", "7"], "test": ["0", "10"]})
    assert release.load_task_data(tmp_path, "G", "val", 8).labels.tolist() == [3, 7]
    assert release.load_task_data(tmp_path, "G", "test", 8, num_classes=43).labels.tolist() == [0, 10]
    # names: the union over splits, sorted (val lacks 'banded')
    _png_tree(tmp_path / "D", {"val": ["blotchy", "zigzag"], "test": ["banded", "blotchy", "zigzag"]})
    assert release.load_task_data(tmp_path, "D", "val", 8).labels.tolist() == [1, 2]
    # classes.txt wins
    (tmp_path / "D" / "classes.txt").write_text("zigzag\nbanded\nblotchy\n")
    assert release.load_task_data(tmp_path, "D", "val", 8).labels.tolist() == [0, 2]  # zigzag, blotchy


def test_subset_of_classes_in_val_keeps_accuracy(standins, tmp_path):
    """A val folder holding only some classes, no classes.txt: labels stay the head's rows."""
    _, converted = standins["tall_masks"]
    root = tmp_path / "r"
    shutil.copytree(converted, root)
    (root / "data" / "DTD" / "classes.txt").unlink()
    for c in ("banded",):
        shutil.rmtree(root / "data" / "DTD" / "val" / c, ignore_errors=True)
    suite = release.load_suite(root, MODEL, device="cpu")
    assert suite.data("DTD", "val").labels.min() >= 1
    assert suite.finetuned_accuracy("DTD", "val") == 1.0


def test_sorted_names_not_covering_the_head_are_refused(standins, tmp_path):
    _, converted = standins["tall_masks"]
    root = tmp_path / "r"
    shutil.copytree(converted, root)
    (root / "data" / "DTD" / "classes.txt").unlink()
    for split in ("val", "test"):
        shutil.rmtree(root / "data" / "DTD" / split / "banded", ignore_errors=True)
    with pytest.raises(ValueError, match=r"task 'DTD': the head has 4 classes .* names 3.*classes\.txt"):
        release.load_suite(root, MODEL, device="cpu")


def test_best_alpha_never_chooses_nan():
    sweep = pd.DataFrame({"alpha": [0.1, 0.1, 0.2, 0.2], "task": ["A", "B", "A", "B"],
                          "normalized_accuracy": [0.5, float("nan"), 0.9, float("nan")]})
    with pytest.raises(ValueError, match=r"NaN for task\(s\) \['B'\]"):
        best_alpha(sweep)
    with pytest.raises(ValueError, match="empty"):
        best_alpha(sweep.iloc[:0])
    assert best_alpha(sweep.fillna(0.0)) == 0.2


# ------------------------------------------------------------------ defect: head / data mismatch


def test_head_data_mismatch_is_one_line(standins, tmp_path):
    _, converted = standins["tall_masks"]
    root = tmp_path / "r"
    shutil.copytree(converted, root)
    from safetensors.torch import save_file

    head = root / MODEL / "head_DTDVal.safetensors"
    save_file({"weight": torch.randn(2, CONFIG["embed_dim"])}, str(head))  # a 2-class head on 4-class data
    with pytest.raises(ValueError) as err:
        release.load_suite(root, MODEL, device="cpu")
    msg = str(err.value)
    assert "task 'DTD'" in msg and "2" in msg and "4" in msg and "\n" not in msg
    # .pt data whose labels exceed the head
    release.save_task_data(root / "data", "DTD", "val", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 3]))
    shutil.rmtree(root / "data" / "DTD" / "val")
    shutil.rmtree(root / "data" / "DTD" / "test")
    (root / "data" / "DTD" / "classes.txt").unlink()
    with pytest.raises(ValueError, match=r"task 'DTD': label 3 .* only 2 rows"):
        release.load_suite(root, MODEL, device="cpu")


# ------------------------------------------------------------------ defect: wrong architecture


def test_wrong_model_is_one_line_at_load_time(standins, tmp_path):
    from subboost.zoo.model import register_model_config

    _, converted = standins["task_vectors"]
    wide = {**CONFIG, "vision_cfg": {**CONFIG["vision_cfg"], "width": 96}}
    register_model_config("standin-vit-wide", wide, tmp_path)
    root = tmp_path / "r"
    shutil.copytree(converted, root)
    (root / MODEL).rename(root / "standin-vit-wide")
    with pytest.raises(ValueError) as err:
        release.load_suite(root, "standin-vit-wide", device="cpu")
    msg = str(err.value)
    assert msg.startswith("model 'standin-vit-wide' does not match") and "\n" not in msg and "shapes" in msg
    with pytest.raises(ValueError, match="model 'nope' is neither an open_clip architecture"):
        release.ensure_model_config(root, "nope")


# ------------------------------------------------------------------ book page snippet, chapter 3 labels


def test_real_checkpoints_page_snippet_runs_on_a_small_release(standins):
    text = (REPO / "book" / "real_checkpoints.md").read_text()
    section = text.split("## The $N^\\gamma$ test on real task vectors", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    _, converted = standins["tall_masks"]
    code = code.replace('"/data/checkpoints", "ViT-B-32"', f'"{converted}", "{MODEL}"')
    scope: dict = {}
    exec(compile(code, "real_checkpoints.md", "exec"), scope)
    assert sorted(scope["by_n"]) == [2, 3]  # the counts that the 3-task release allows
    assert len(scope["table"]) > 0


def test_paper_columns_only_for_the_papers_model():
    from subboost import paper

    assert paper.comparable_label("ViT-B-32", "ViT-B-32") == "paper ViT-B/32"
    assert paper.comparable_label("ViT-B-32", None) == "paper ViT-B/32"  # the mini zoo: reference
    assert paper.comparable_label("ViT-B-32", "ViT-L-14") is None
    assert paper.paper_table_for(paper.TABLE1_VIT_B32, "ViT-B-32", "ViT-L-14").shape[1] == 0
    source = (REPO / "notebooks" / "03_subspace_boosting.md").read_text()
    assert 'label="paper ViT-B/32"' not in source and '"paper ViT-B/16' not in source


# ------------------------------------------------------------------ one smoke chapter, both layouts (slow)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tall_masks", "task_vectors"])
def test_smoke_chapter_on_the_standin(standins, layout, tmp_path):
    from subboost.book import execute_book

    s, converted = standins[layout]
    # tall_masks: the converted release (base supplied), chapter 3 as on the book's page
    chapter, params = "03", {"checkpoint_root": str(converted), "model": MODEL, "run_benchmarks": False}
    if layout == "task_vectors":  # the raw release: pickles opted into, data from the converter
        chapter, params = "01", {"checkpoint_root": str(s.root), "model": MODEL, "allow_pickle": True,
                                 "data_root": str(converted / "data"), "tasks": ["DTD", "EuroSAT", "SUN397"]}
    runs = execute_book(profile="smoke", device="cpu", chapters=[chapter], overrides=params,
                        executed_dir=tmp_path / "executed")
    assert [r.status for r in runs] == ["ok"]


def test_in_place_merge_matches_the_merged_state_dict(standins):
    """VisionSuite.load_merged (in place, per α) against θ0 + α·Δ built by apply_task_vector."""
    from subboost.evaluate import merged_state

    _, converted = standins["task_vectors"]
    suite = release.load_suite(converted, MODEL, device="cpu")
    delta = merge(suite.task_vectors(), "ta")
    suite.finetuned_accuracy("DTD")  # the shared tower last held an expert
    got = {k: v.clone() for k, v in suite.load_merged(delta, 0.7).state_dict().items()}
    ref = suite.load_visual(merged_state(suite, delta, 0.7)).state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="alpha must be finite"):
        suite.load_merged(delta, float("nan"))


def test_small_real_models_use_one_cpu_thread(standins):
    """Tiny towers pay more in thread synchronisation than they gain; real ViTs keep the default."""
    from subboost.experiments import configure_cpu_threads

    _, converted = standins["tall_masks"]
    try:
        torch.set_num_threads(2)
        assert configure_cpu_threads({"device": "cpu", "checkpoint_root": str(converted), "model": MODEL}) == 1
        torch.set_num_threads(2)
        assert configure_cpu_threads({"device": "cpu", "checkpoint_root": str(converted), "model": "ViT-B-32"}) == 2
    finally:
        torch.set_num_threads(1)


def test_gtsrb_and_resisc45_folders(tmp_path):
    """The two special formats: GTSRB's CSV-labelled test folder (.ppm only in training), RESISC45's split lists."""
    write_authors_data(tmp_path / "authors", ("GTSRB", "RESISC45"), per_class={"GTSRB": 10, "RESISC45": 10})
    convert(tmp_path / "out", data=tmp_path / "authors", tasks=["GTSRB", "RESISC45"])
    out = tmp_path / "out" / "data"
    gt = release.load_task_data(out, "GTSRB", "test", 32, num_classes=3)
    assert sorted(gt.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # from the CSV's ClassId
    assert len(list((out / "GTSRB" / "val").rglob("*.ppm"))) == 3  # int(0.1 · 30) training images
    assert not list(out.rglob("*.csv"))
    rs = release.load_task_data(out, "RESISC45", "test", 32, num_classes=3)
    assert rs.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]  # 3 listed test images per class, interleaved
    listed = set((tmp_path / "authors" / "resisc45" / "resisc45-test.txt").read_text().split())
    assert {p.name for p in (out / "RESISC45" / "test").rglob("*.jpg")} == listed


def test_library_takes_a_user_supplied_base(standins):
    """The raw tall_masks release has no base; an open_clip state dict (text tower included) is accepted."""
    s, converted = standins["tall_masks"]
    suite = release.load_suite(s.root, MODEL, data_root=converted / "data", allow_pickle=True, device="cpu",
                               base=s.base_file)
    assert not any(k.startswith("transformer.") for k in suite.base_state)
    assert suite.finetuned_accuracy("EuroSAT") == 1.0 and len(suite.task_vectors()) == 3
    with pytest.raises(FileNotFoundError, match="parameter base"):
        release.load_suite(s.root, MODEL, allow_pickle=True, base=s.root / "nope.pt")
