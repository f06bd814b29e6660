"""The executor seam: the local loop and a real Ray cluster give the same tables.

The Ray tests start a cluster of real processes (a head and two worker nodes, ``ray start``)
inside a network namespace whose only interface is the loopback, so it is never reachable
from outside; they are skipped where Ray (the ``cluster`` extra) or ``unshare -n`` is missing.
The cluster lives in one driver process (tests/ray_sweep_driver.py), run once per session;
its node processes are ended in the fixture's finalizer whatever happens.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from subboost import executor as exe

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ without a cluster


def test_local_executor_keeps_order():
    assert exe.LocalExecutor().map(lambda x: x * x, [3, 1, 2]) == [9, 1, 4]


def test_parse_ray_address():
    assert exe.parse_ray_address("127.0.0.1:6380") == ("127.0.0.1", 6380)
    assert exe.parse_ray_address("ray://head.example:10002") == ("head.example", 10002)
    assert exe.parse_ray_address("ray://head") == ("head", exe.RAY_CLIENT_PORT)
    assert exe.parse_ray_address("head") == ("head", exe.RAY_GCS_PORT)
    for bad in ("", "host:port", "host:0", "host:70000", None):
        with pytest.raises(ValueError, match="ray_address"):
            exe.parse_ray_address(bad)


def test_unreachable_address_is_one_line_naming_it():
    port = exe.free_port()  # nothing listens there
    t = time.perf_counter()
    with pytest.raises(ValueError) as err:
        exe.check_ray_address(f"127.0.0.1:{port}", timeout_s=2)
    assert time.perf_counter() - t < 5
    msg = str(err.value)
    assert msg.startswith("parameter 'ray_address'") and f"127.0.0.1:{port}" in msg and "\n" not in msg


def test_validate_executor():
    assert exe.validate_executor("local", None) == ("local", None)
    with pytest.raises(ValueError, match="parameter 'executor'"):
        exe.validate_executor("dask", None)
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match="parameter 'ray_address'.*needs"):
        exe.validate_executor("ray", None)


def test_results_table_local_executor_is_the_default(monkeypatch):
    """``executor='local'`` is the plain loop: identical rows to the default call."""
    from test_experiments import StubSuite
    from subboost import experiments as ex

    v = [ex.Variant("TA", "ta", alpha_grid=(0.5,))]
    a = ex.results_table(StubSuite(), [2, 3], v, progress=False)
    b = ex.results_table(StubSuite(), [2, 3], v, progress=False, executor="local")
    pd.testing.assert_frame_equal(a.drop(columns="merge_seconds"), b.drop(columns="merge_seconds"), check_exact=True)


def test_remote_executor_needs_a_suite_spec():
    from test_experiments import StubSuite
    from subboost import experiments as ex

    with pytest.raises(ValueError, match="load_suite_from_parameters"):
        ex.suite_spec(StubSuite())


def test_book_runner_rejects_unreachable_address(capsys):
    """``--executor ray`` with an address nobody answers at stops at once: exit 2, one line."""
    pytest.importorskip("ray")
    from subboost import book

    port = exe.free_port()
    t = time.perf_counter()
    code = book.main(["execute", "--profile", "smoke", "--chapters", "03", "--executor", "ray",
                      "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.perf_counter() - t < 10
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "ray_address" in err


# ------------------------------------------------------------------ a real cluster


def _kill_nodes(out: Path) -> None:
    pids = out / "pids.txt"
    if not pids.exists():
        return
    for pid in pids.read_text().split():
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    pytest.importorskip("ray")
    out = tmp_path_factory.mktemp("ray_sweep")
    cmd = exe.loopback_namespace_command([sys.executable, str(ROOT / "tests" / "ray_sweep_driver.py"),
                                          "--out", str(out)])
    if cmd is None:
        pytest.skip("needs `unshare -n` to keep the test cluster on the loopback interface")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    finally:
        _kill_nodes(out)  # the cluster is down whatever happened in the driver
    if proc.returncode != 0 or not (out / "result.pkl").exists():
        pytest.fail(f"the Ray driver failed (exit {proc.returncode}):\n{log.decode(errors='replace')[-3000:]}")
    with open(out / "result.pkl", "rb") as f:
        got = pickle.load(f)
    got["out"] = out
    return got


TIMINGS = ["merge_seconds"]


def test_ray_table_equals_local_exactly(cluster_run):
    local, ray = cluster_run["local"], cluster_run["ray"]
    assert len(local) == 2 * 2 + 2 * 3  # reference rows + 3 variants at N = 2, 3
    pd.testing.assert_frame_equal(local.drop(columns=TIMINGS), ray.drop(columns=TIMINGS), check_exact=True)


def test_killed_worker_is_retried_not_dropped(cluster_run):
    """One worker SIGKILLs itself in the middle of a unit: Ray reruns the unit elsewhere and
    every row is there, equal to the local one, in order."""
    assert cluster_run["killed_pid"]  # the kill did happen
    local = cluster_run["local"]
    rows = pd.DataFrame(cluster_run["retried"])
    assert [f"{m} on {n} tasks" for m, n in zip(rows.method, rows.n_tasks)] == cluster_run["units"]
    want = local[~local.method.isin(["Zero-shot", "Fine-tuned"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(want.drop(columns=TIMINGS + ["alpha_at_edge"]),
                                  rows.drop(columns=TIMINGS + ["alpha_at_edge"])[want.drop(columns=TIMINGS + ["alpha_at_edge"]).columns],
                                  check_exact=True)


def test_killed_worker_without_retries_is_reported(cluster_run):
    msg = cluster_run["no_retry_error"]
    assert msg is not None and "unit 5 of 6 (TA+SB on 3 tasks)" in msg and "0 retries" in msg


def test_cluster_is_down_after_the_run(cluster_run):
    for pid in (cluster_run["out"] / "pids.txt").read_text().split():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


@pytest.mark.slow
def test_chapter_through_ray_gives_the_local_tables(tmp_path):
    """Chapter 3 (smoke profile) executed as a Ray task on a 2-worker cluster, its sweeps
    spread over the cluster, writes the same tables as a local run."""
    pytest.importorskip("ray")
    cmd = exe.loopback_namespace_command([sys.executable, str(ROOT / "tests" / "ray_sweep_driver.py"),
                                          "--out", str(tmp_path), "--chapter", "03", "--profile", "smoke"])
    if cmd is None:
        pytest.skip("needs `unshare -n` to keep the test cluster on the loopback interface")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        _kill_nodes(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "result.pkl", "rb") as f:
        codes = pickle.load(f)
    assert codes["ray"] == 0 and codes["local"] == 0, (tmp_path / "ray" / "execution_report.txt").read_text()
    name = "03_subspace_boosting"
    assert (tmp_path / "ray" / f"{name}.ipynb").is_file()
    tables = sorted(p.name for p in (tmp_path / "local" / name).glob("*.csv"))
    assert {"table1.csv", "table4.csv", "beta.csv", "layers.csv"} <= set(tables)
    for t in tables:
        a = pd.read_csv(tmp_path / "local" / name / t)
        b = pd.read_csv(tmp_path / "ray" / name / t)
        drop = [c for c in a.columns if c.endswith("seconds")]  # timings (merge, ESM's capture)
        pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop), check_exact=True)


def test_local_executor_object_takes_the_plain_loop():
    """A LocalExecutor (what chapters build from executor='local') runs today's loop on the
    suite object itself: no suite spec needed, same rows."""
    from test_experiments import StubSuite
    from subboost import experiments as ex

    v = [ex.Variant("TA", "ta", alpha_grid=(0.5,))]
    a = ex.results_table(StubSuite(), [2, 3], v, progress=False)
    b = ex.results_table(StubSuite(), [2, 3], v, progress=False, executor=exe.make_executor("local"))
    pd.testing.assert_frame_equal(a.drop(columns="merge_seconds"), b.drop(columns="merge_seconds"), check_exact=True)


def test_cluster_page_fragment_is_staged_or_explained(tmp_path):
    """The cluster page includes book/_generated/ray_scaling.md: the benchmark's own fragment
    and figure when benchmarks/results has them, else a sentence naming the command."""
    from subboost import book

    book.stage_benchmark_fragments(tmp_path, tmp_path / "stage")
    text = (tmp_path / "stage" / "book" / "_generated" / "ray_scaling.md").read_text()
    assert "python benchmarks/ray_scaling.py" in text
    assert not (tmp_path / "stage" / "book" / "_generated" / "ray_scaling.png").exists()

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "ray_scaling.md").write_text("| measured |\n\n![scaling](ray_scaling.png)\n")
    (results / "ray_scaling.png").write_bytes(b"\x89PNG")
    book.stage_benchmark_fragments(tmp_path, tmp_path / "stage2")
    staged = tmp_path / "stage2" / "book" / "_generated"
    assert (staged / "ray_scaling.md").read_text().startswith("| measured |")
    assert (staged / "ray_scaling.png").read_bytes() == b"\x89PNG"
    toc = (ROOT / "_toc.yml").read_text()
    assert "book/cluster" in toc and "_generated/ray_scaling.md" in (ROOT / "book" / "cluster.md").read_text()
