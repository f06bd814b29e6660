"""The book runner: parameter validation, failure reports, the chapters' contract, and (slow)
executing every chapter with the smoke profile, building the site and checking every page in
headless Chromium (figures and typeset math)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
import torch

from subboost import book

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ parameters (fast)


@pytest.mark.parametrize("params, name", [
    (dict(profile="huge"), "profile"),
    (dict(device="tpu"), "device"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(task_counts=[]), "task_counts"),
    (dict(task_counts=[4, 4]), "task_counts"),
    (dict(task_counts=[0, 4]), "task_counts"),
    (dict(task_counts="4,8"), "task_counts"),
    (dict(sweep_task_counts=[]), "sweep_task_counts"),
    (dict(betas=[0.0, 1.5]), "betas"),
    (dict(betas=[-0.1]), "betas"),
    (dict(betas=None), "betas"),
    (dict(alpha_grid=[0.0]), "alpha_grid"),
    (dict(alpha_grid=[float("nan")]), "alpha_grid"),
    (dict(gammas=[-1]), "gammas"),
    (dict(checkpoint_root="/no/such/folder"), "checkpoint_root"),
    (dict(model=""), "model"),
])
def test_bad_parameter_fails_naming_it(params, name):
    with pytest.raises(book.ParameterError, match=f"parameter '{name}'"):
        book.validate_parameters(**params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_fails_naming_device():
    with pytest.raises(book.ParameterError, match="parameter 'device'.*CUDA"):
        book.validate_parameters(device="cuda")


def test_good_parameters_are_normalised(tmp_path):
    p = book.validate_parameters(profile="ci", device="cpu", seed=3, output_dir=str(tmp_path / "o"),
                                 task_counts=[20, 4, 8], betas=[0, 0.5], alpha_grid=[1],
                                 sweep_task_counts=None, extra="kept")
    assert p["task_counts"] == [4, 8, 20] and p["betas"] == [0.0, 0.5] and p["alpha_grid"] == [1.0]
    assert p["device"] == "cpu" and p["device_requested"] == "cpu" and p["extra"] == "kept"
    assert p["output_dir"].is_dir() and p["sweep_task_counts"] is None
    assert book.validate_parameters(device="auto")["device"] in ("cpu", "cuda")


def test_cli_rejects_bad_values_before_starting_a_kernel(capsys):
    t0 = time.perf_counter()
    assert book.main(["execute", "--profile", "smoke", "--chapters", "02", "--param", "betas=[0.5, 2]"]) == 2
    assert "parameter 'betas'" in capsys.readouterr().err
    assert book.main(["execute", "--profile", "smoke", "--param", "task_counts=[]"]) == 2
    assert "parameter 'task_counts'" in capsys.readouterr().err
    # bad requests to the runner are bad input (2), not a failed chapter (1)
    assert book.main(["execute", "--profile", "smoke", "--chapters", "02", "--param", "no_such=1"]) == 2
    assert "parameter 'no_such' is not declared" in capsys.readouterr().err
    assert book.main(["execute", "--profile", "smoke", "--param", "profile=full"]) == 2
    assert "--profile" in capsys.readouterr().err
    assert book.main(["execute", "--profile", "smoke", "--param", "profile=huge"]) == 2
    assert "--profile" in capsys.readouterr().err
    assert book.main(["execute", "--profile", "smoke", "--param", "device=tpu"]) == 2
    assert "--device" in capsys.readouterr().err
    assert book.main(["execute", "--chapters", "99"]) == 2
    assert "no chapter matches '99'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        book.main(["execute", "--profile", "huge"])
    assert "--profile" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("chapters,param,name", [
    ([], "pi=-1", "pi"),  # chapter 4 only, on a whole-book run
    (["02"], "n_repeats=0", "n_repeats"),
    (["02"], "matrix_size=3", "matrix_size"),
    (["02"], "common_rank=1000", "common_rank"),  # checked against the profile's matrix size
    (["02"], "noise_fraction=9", "noise_fraction"),
    ([], "n_random_draws=0", "n_random_draws"),
    ([], "esm_images=0", "esm_images"),
    ([], "run_esm=maybe", "run_esm"),
    ([], "lines_b_grid=[a]", "lines_b_grid"),
    (["01"], "data_root=/no/such/folder", "data_root"),
])
def test_chapter_specific_parameters_are_checked_before_any_kernel(tmp_path, capsys, chapters, param, name):
    executed = tmp_path / "executed"
    args = ["execute", "--profile", "smoke", "--executed-dir", str(executed), "--param", param]
    args += ["--chapters", *chapters] if chapters else []
    assert book.main(args) == 2
    assert f"parameter '{name}'" in capsys.readouterr().err
    assert not executed.exists()  # no chapter ran, no report was written


@pytest.mark.parametrize("profile", book.PROFILES)
def test_every_chapter_accepts_its_own_defaults(profile):
    for chapter in book.discover_chapters():
        book.check_chapter_parameters(chapter, profile=profile, device="cpu", seed=0)


def test_parse_param_reads_yaml():
    assert book.parse_param("task_counts=[4, 8]") == ("task_counts", [4, 8])
    assert book.parse_param("betas=[0.0,0.02]") == ("betas", [0.0, 0.02])
    assert book.parse_param("checkpoint_root=null") == ("checkpoint_root", None)
    assert book.parse_param("model=ViT-B-32") == ("model", "ViT-B-32")
    with pytest.raises(book.BookError):
        book.parse_param("novalue")


def test_provenance_line(tmp_path):
    p = book.provenance("smoke", "cpu", time.time() - 2.0)
    text = p._repr_markdown_()
    assert "profile `smoke`" in text and "device `cpu`" in text and "wall time" in text
    assert p.wall_time_s >= 2.0 and re.fullmatch(r"[0-9a-f]{12}|unknown", p.commit)


# ------------------------------------------------------------------ chapters' contract (fast)


def test_every_chapter_follows_the_template():
    chapters = book.discover_chapters()
    assert [c.name[:2] for c in chapters] == ["01", "02", "03", "04", "05", "06"]
    toc = (ROOT / "_toc.yml").read_text()
    for ch in chapters:
        nb = book.load_chapter(ch)
        declared = book.declared_parameters(nb, ch.name)
        assert set(book.REQUIRED_PARAMETERS) <= set(declared), ch.name
        idx = book.parameters_cell_index(nb, ch.name)
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        after = [c.source for c in nb.cells[idx + 1:] if c.cell_type == "code"]
        assert "validate_parameters(" in after[0], f"{ch.name}: validate right after the parameters cell"
        assert "provenance(" in code[-1], f"{ch.name}: the last code cell shows the provenance"
        assert f"notebooks/{ch.name}" in toc


# ------------------------------------------------------------------ a failing cell (fast-ish)

FAILING = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A chapter that fails

```{code-cell} ipython3
:tags: [parameters]

profile = "ci"
device = "auto"
seed = 0
output_dir = None
```

```{code-cell} ipython3
x = 1
```

```{code-cell} ipython3
y = x / 0
```
"""


def test_failing_cell_gives_nonzero_exit_and_readable_report(tmp_path, capsys):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_fails.md").write_text(FAILING)
    out = tmp_path / "executed"
    code = book.main(["execute", "--profile", "smoke", "--device", "cpu", "--notebooks-dir", str(nbdir),
                      "--executed-dir", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "01_fails" in err and "ZeroDivisionError" in err
    report = (out / book.REPORT_NAME).read_text()
    assert "Chapter 01_fails FAILED" in report
    assert "y = x / 0" in report and "ZeroDivisionError" in report
    assert f"line {FAILING.splitlines().index('y = x / 0') + 1} of 01_fails.md" in report
    assert "\x1b[" not in report  # no terminal colour codes
    assert (out / "01_fails.failed.ipynb").exists() and not (out / "01_fails.ipynb").exists()
    assert json.loads((out / book.MANIFEST_NAME).read_text())["01_fails"]["status"] == "failed"
    with pytest.raises(book.BookError, match="no executed notebook"):
        book.stage_site(executed_dir=out, stage_dir=tmp_path / "stage")


TALKATIVE = FAILING.replace("# A chapter that fails", "# A chapter that reports progress").replace(
    "y = x / 0", "from subboost.book import route_progress\nimport sys, time\nrouted = route_progress()\n"
    "print('zoo stage: pretrain 3/10', file=sys.stderr, flush=True)\ntime.sleep(1.5)\nrouted")


def test_progress_reaches_the_terminal_not_the_notebook(tmp_path, capsys):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_talks.md").write_text(TALKATIVE)
    out = tmp_path / "executed"
    assert book.main(["execute", "--profile", "smoke", "--device", "cpu", "--notebooks-dir", str(nbdir),
                      "--executed-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert re.search(r"\[01_talks \d\d:\d\d\] zoo stage: pretrain 3/10", captured.err)  # the side channel, live
    assert "01_talks" in captured.err and "cell" in captured.err  # papermill's cell bar
    assert "01_talks" in captured.out and "total" in captured.out  # the timing table
    nb = nbformat.read(out / "01_talks.ipynb", as_version=4)
    streams = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not streams  # no progress noise in the executed notebook
    assert os.environ.get(book.PROGRESS_ENV) is None  # the runner restored its environment


SHARING = FAILING.replace("output_dir = None\n", "output_dir = None\nresults_cache = None\n").replace(
    "y = x / 0", "import pathlib\npathlib.Path(output_dir).mkdir(parents=True)\n"
    "pathlib.Path(output_dir, 'cache.txt').write_text(str(results_cache))")


def test_runner_gives_chapters_that_declare_it_one_shared_results_cache(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_shares.md").write_text(SHARING)
    (nbdir / "02_fails.md").write_text(FAILING)  # declares no results_cache: gets none
    out = tmp_path / "executed"
    book.main(["execute", "--profile", "smoke", "--device", "cpu", "--notebooks-dir", str(nbdir),
               "--executed-dir", str(out), "--keep-going"])
    assert (out / "01_shares" / "cache.txt").read_text() == str(out / book.RESULTS_CACHE_NAME)
    assert json.loads((out / book.MANIFEST_NAME).read_text())["01_shares"]["status"] == "ok"
    assert "results_cache" not in nbformat.read(out / "02_fails.failed.ipynb", as_version=4).cells[1].source


def test_generated_pages_from_records(tmp_path):
    from subboost import claims

    executed, stage = tmp_path / "executed", tmp_path / "stage"
    (stage / "notebooks").mkdir(parents=True)
    shutil.copy2(ROOT / "_toc.yml", stage / "_toc.yml")
    (stage / "notebooks" / "02_propositions.ipynb").write_text("{}")
    executed.mkdir()
    (executed / book.MANIFEST_NAME).write_text(json.dumps({"02_propositions": dict(
        status="ok", wall_time_s=12.5, profile="smoke", device="cpu", commit="abc", dirty=False,
        finished_utc="2026-01-01T00:00:00+00:00")}))
    claims.write_record(executed / "02_propositions", "02_propositions",
                        {"prop4": claims.prop4(1.0, 16)}, dict(commit="abc", profile="smoke", device="cpu"), "synthetic")
    written = book.write_generated_pages(stage, executed)
    assert {p.name for p in written} == {"findings.md", "execution.md"}
    findings = (stage / book.FINDINGS_PAGE).read_text()
    assert findings.startswith("# Findings at a glance")
    assert "{ref}`Supp. E, Eq. 29 <claim-prop4>`" in findings  # staged chapter: linked
    assert "<claim-table1>" not in findings  # chapter 3 not staged: no dangling link
    assert findings.count("**not run**") == len(claims.CLAIMS) - 1 and "**reproduced**" in findings
    assert "synthetic · smoke · cpu · abc" in findings
    execution = (stage / book.EXECUTION_PAGE).read_text()
    assert "| 02_propositions | ok | 12.5 | smoke | cpu | abc |" in execution
    assert "02_propositions" in book.timing_text(executed) and "not run" in book.findings_text(executed)


# ------------------------------------------------------------------ the whole book (slow)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars"]


def _chrome(binary: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, *CHROME_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    """Execute every chapter (smoke profile, CPU) and build the site, in a temporary folder.

    With ``SUBBOOST_BUILT_BOOK=DIR`` the checks run on a book already executed and built there
    (``DIR/executed``, ``DIR/html``, as ``make book`` leaves them in ``_build``), so that CI
    checks the ``ci`` profile's site without executing the chapters twice.
    """
    prebuilt = os.environ.get("SUBBOOST_BUILT_BOOK")
    if prebuilt:
        root = Path(prebuilt).resolve()
        if not (root / "executed" / book.MANIFEST_NAME).is_file():
            pytest.fail(f"SUBBOOST_BUILT_BOOK={prebuilt}: no executed book there (run `make book` first)")
        executed, site = root / "executed", root / "html"
        manifest = json.loads((executed / book.MANIFEST_NAME).read_text())
        runs = [book.ChapterRun(chapter=name, status=m["status"], wall_time_s=m["wall_time_s"],
                                notebook=executed / f"{name}.ipynb") for name, m in sorted(manifest.items())]
        profiles = {m["profile"] for m in manifest.values()}
        devices = {m["device"] for m in manifest.values()}
        return dict(executed=executed, site=site, runs=runs, execute_s=None, build_s=None,
                    profile=profiles.pop() if len(profiles) == 1 else None,
                    device=devices.pop() if len(devices) == 1 else None)
    base = tmp_path_factory.mktemp("book")
    executed, stage, site = base / "executed", base / "stage", base / "html"
    t0 = time.perf_counter()
    runs = book.execute_book(profile="smoke", device="cpu", executed_dir=executed)
    t1 = time.perf_counter()
    book.build_site(executed_dir=executed, stage_dir=stage, site_dir=site)
    t2 = time.perf_counter()
    return dict(executed=executed, site=site, runs=runs, execute_s=t1 - t0, build_s=t2 - t1,
                profile="smoke", device="cpu")


def _image_outputs(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))


def _has_math(nb) -> bool:
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    md += "\n".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
    return bool(re.search(r"\$[^$]+\$", md))


@pytest.mark.slow
def test_chapters_execute_with_provenance(built_book):
    assert [r.status for r in built_book["runs"]] == ["ok"] * len(built_book["runs"])
    for r in built_book["runs"]:
        nb = nbformat.read(r.notebook, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"]
        last = [c for c in nb.cells if c.cell_type == "code"][-1]
        md = "".join(o.get("data", {}).get("text/markdown", "") for o in last.outputs)
        assert "Provenance" in md
        if built_book["profile"]:
            assert f"profile `{built_book['profile']}`" in md
        if built_book["device"] in ("cpu", "cuda"):
            assert f"device `{built_book['device']}`" in md
    ch2 = nbformat.read(built_book["executed"] / "02_propositions.ipynb", as_version=4)
    assert _image_outputs(ch2) >= 8
    assert (built_book["executed"] / "02_propositions" / "prop1_decay.png").is_file()
    summary = (built_book["executed"] / "02_propositions" / "summary.csv").read_text()
    assert "Prop. 4" in summary


@pytest.mark.slow
def test_appendix_and_chapter_3_agree_on_the_books_zoo(built_book):
    """The appendix's TA / TA+SB / ±LiNeS merges on the chapters' zoo are chapter 3's Table 1
    merges (same settings, read back from the book run's result cache): same α, b and accuracy."""
    import pandas as pd

    from subboost.chapters import zoo_calibration as zc

    profile = built_book["profile"]
    labels = [label for label, zoo in zc.ZOO_SETS.get(profile, ()) if zoo == profile]
    if not labels:
        pytest.skip(f"profile {profile}: the appendix does not run on the chapters' zoo")
    head = pd.read_csv(built_book["executed"] / "06_zoo_calibration" / "headline_results.csv")
    head = head[head.zoo == labels[0]].set_index(["method", "n_tasks"])
    table1 = pd.read_csv(built_book["executed"] / "03_subspace_boosting" / "table1.csv").set_index(["method", "n_tasks"])
    shared = [k for k in head.index if k in table1.index and k[0] in ("TA", "TA+SB", "TA+LiNeS", "TA+LiNeS+SB")]
    assert {k[0] for k in shared} == {"TA", "TA+SB", "TA+LiNeS", "TA+LiNeS+SB"}
    for key in shared:
        for col in ("accuracy", "alpha", "lines_b"):
            a, b = head.loc[key, col], table1.loc[key, col]
            assert (pd.isna(a) and pd.isna(b)) or a == b, (key, col, a, b)


@pytest.mark.slow
def test_site_offers_downloads_and_offline_math(built_book):
    site = built_book["site"]
    toc_files = book._toc_files(ROOT / "_toc.yml")
    for entry in toc_files:
        assert (site / f"{entry}.html").is_file(), entry
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for ch in book.discover_chapters():
        html = (site / "notebooks" / f"{ch.name}.html").read_text()
        assert f"_sources/notebooks/{ch.name}.ipynb" in html  # the download button
        assert "cdn.jsdelivr.net" not in html and "mathjax@" not in html  # no CDN
        src = nbformat.read(site / "_sources" / "notebooks" / f"{ch.name}.ipynb", as_version=4)
        if _has_math(src):
            assert "_static/mathjax/tex-chtml.js" in html, f"{ch.name}: MathJax is not the offline copy"
        assert any(c.get("outputs") for c in src.cells if c.cell_type == "code")  # executed, not the source
        for c in src.cells:  # set-up cells collapsed on the page
            if {"parameters", "injected-parameters"} & set(c.get("metadata", {}).get("tags", [])):
                assert "hide-input" in c.metadata.tags, ch.name


@pytest.mark.slow
def test_every_page_renders_figures_and_math_in_chromium(built_book, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the site itself was built")
    site = built_book["site"]
    redirect = book.first_chapter_page(site)
    assert redirect.is_file()
    pages = [(e, site / f"{e}.html") for e in book._toc_files(ROOT / "_toc.yml")]
    for entry, page in pages:
        proc = _chrome(binary, "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri())
        dom = proc.stdout
        assert "<h1" in dom, f"{entry}: no page rendered ({proc.stderr[-500:]})"
        assert "<mjx-merror" not in dom and "Math input error" not in dom, f"{entry}: MathJax error"
        name = Path(entry).name
        executed = built_book["executed"] / f"{name}.ipynb"
        if executed.exists():
            nb = nbformat.read(executed, as_version=4)
            n_img = _image_outputs(nb)
            imgs = re.findall(r'<img[^>]+src="\.\./_images/[^"]+\.png"', dom)
            assert len(imgs) >= n_img, f"{entry}: {len(imgs)} figures in the page, {n_img} in the notebook"
            if _has_math(nb):
                assert dom.count("<mjx-container") > 0, f"{entry}: math not typeset"
        elif (ROOT / f"{entry}.md").is_file() and "$" in (ROOT / f"{entry}.md").read_text():
            assert dom.count("<mjx-container") > 0, f"{entry}: math not typeset"
        shot = tmp_path / f"{name}.png"
        _chrome(binary, "--window-size=1280,2400", "--virtual-time-budget=20000", f"--screenshot={shot}", page.resolve().as_uri())
        assert shot.is_file() and shot.stat().st_size > 20_000, f"{entry}: empty screenshot"
        from PIL import Image

        with Image.open(shot) as im:
            lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, f"{entry}: blank screenshot"


@pytest.mark.slow
def test_findings_page_table_and_links_in_chromium(built_book):
    """The generated "Findings at a glance" page: one table row per claim with a verdict, every
    evidence link resolving to an anchor of an executed chapter, and the page placed right
    after the introduction."""
    from subboost import claims

    site = built_book["site"]
    page = site / "book" / "findings.html"
    assert page.is_file()
    toc = book._toc_files(ROOT / "_toc.yml")
    assert toc[:2] == ["book/intro", "book/findings"]
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the page itself was built")
    dom = _chrome(binary, "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri()).stdout
    assert "Findings at a glance" in dom
    table = re.search(r"<table.*?</table>", dom, re.S)
    assert table, "no table on the findings page"
    rows = re.findall(r"<tr.*?</tr>", table.group(0), re.S)[1:]
    assert len(rows) == len(claims.CLAIMS)
    allowed = set(claims.VERDICTS) | {claims.NOT_RUN}
    for row, claim in zip(rows, claims.CLAIMS.values()):
        text = re.sub(r"<[^>]+>", "", row)
        assert claim.statement.split(":")[0][:20] in text.replace("&amp;", "&")
        assert any(v in text for v in allowed), text
    links = re.findall(r'href="(\.\./notebooks/[^"#]+\.html)#([^"]+)"', table.group(0))
    assert links, "no evidence links"
    for href, anchor in links:
        target = (page.parent / href).resolve()
        assert target.is_file(), href
        assert f'id="{anchor}"' in target.read_text(), f"{href}#{anchor}: no such anchor"
    executed = {r.chapter for r in built_book["runs"] if r.status == "ok"}
    linked = {Path(h).stem for h, _ in links}
    assert {c.chapter for c in claims.CLAIMS.values()} & executed <= linked
    assert (site / "book" / "execution.html").is_file()
