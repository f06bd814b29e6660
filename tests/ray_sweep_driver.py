"""Driver of the Ray executor tests (run by tests/test_executor.py in a network namespace
whose only interface is the loopback): starts a local Ray cluster of real processes, runs
a smoke sweep locally and through the cluster, kills a worker mid-sweep, and pickles what
it saw into ``--out``. Not a test module itself (pytest does not collect it)."""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import torch

from subboost import experiments as ex
from subboost.executor import ExecutorError, LocalCluster, RayExecutor

torch.set_num_threads(1)

ALPHAS = (0.3, 1.0)
VARIANTS = (ex.Variant("TA", "ta", alpha_grid=ALPHAS), ex.Variant("TA+SB", "ta", boost_beta=0.0, alpha_grid=ALPHAS),
            ex.Variant("TIES+SB", "ties", {"top_k": 0.2}, boost_beta=0.0, alpha_grid=ALPHAS))
COUNTS = (2, 3)


def kill_first_attempt(unit, marker=None):
    """Run the unit, except that the first process to reach the unit of ``marker`` kills
    itself (SIGKILL, no clean-up) before answering: a worker lost mid-sweep."""
    if marker is not None and unit.variant.label == "TA+SB" and len(unit.tasks) == 3:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            fd = None
        if fd is not None:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return ex.run_variant_unit(unit)


def run_chapter(args, env) -> int:
    """Execute one chapter with the local runner and through a 2-worker cluster."""
    from subboost import book

    codes = {}
    t0 = time.perf_counter()
    with LocalCluster(workers=2, cpus_per_worker=1, env=env) as cluster:
        (args.out / "pids.txt").write_text(" ".join(str(p.pid) for p in cluster.nodes))
        common = ["execute", "--profile", args.profile, "--device", "cpu", "--chapters", args.chapter]
        t = time.perf_counter()
        codes["ray"] = book.main([*common, "--executor", "ray", "--address", cluster.address,
                                  "--executed-dir", str(args.out / "ray")])
        codes["ray_s"] = time.perf_counter() - t
    t = time.perf_counter()
    codes["local"] = book.main([*common, "--executed-dir", str(args.out / "local")])
    codes["local_s"] = time.perf_counter() - t
    codes["total_s"] = time.perf_counter() - t0
    with open(args.out / "result.pkl", "wb") as f:
        pickle.dump(codes, f)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chapter", default=None, help="instead of the sweep: execute this chapter locally and "
                    "with --executor ray (book runner), into --out/local and --out/ray")
    ap.add_argument("--profile", default="smoke")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": os.pathsep.join([root, str(Path(__file__).resolve().parent)])}
    if args.chapter:
        return run_chapter(args, env)
    got: dict = {}
    t0 = time.perf_counter()
    with LocalCluster(workers=2, cpus_per_worker=1, env=env) as cluster:
        (args.out / "pids.txt").write_text(" ".join(str(p.pid) for p in cluster.nodes))
        got["start_s"] = time.perf_counter() - t0
        suite = ex.load_suite_from_parameters({"profile": "smoke", "device": "cpu"})
        got["local"] = ex.results_table(suite, COUNTS, VARIANTS, progress=False)
        spec = ex.suite_spec(suite)
        subsets = ex.task_subsets(suite, COUNTS)
        first = tuple(subsets[min(subsets)])
        units = [ex.VariantUnit(spec, tuple(subsets[n]), v, None, first) for n in subsets for v in VARIANTS]
        got["units"] = [u.describe() for u in units]
        with RayExecutor(cluster.address, max_retries=2) as runner:  # one job: workers stay warm
            t = time.perf_counter()
            got["ray"] = ex.results_table(suite, COUNTS, VARIANTS, progress=False, executor="ray",
                                          ray_address=cluster.address)  # the chapters' route
            got["ray_s"] = time.perf_counter() - t
            marker = str(args.out / "killed_once")
            got["retried"] = runner.map(lambda u: kill_first_attempt(u, marker), units, describe=ex.VariantUnit.describe)
            got["killed_pid"] = Path(marker).read_text() if Path(marker).exists() else None
            marker0 = str(args.out / "killed_no_retry")
            try:
                runner.max_retries = 0
                runner.map(lambda u: kill_first_attempt(u, marker0), units, describe=ex.VariantUnit.describe)
                got["no_retry_error"] = None
            except ExecutorError as err:
                got["no_retry_error"] = str(err)
        got["spec"] = spec
    got["total_s"] = time.perf_counter() - t0
    with open(args.out / "result.pkl", "wb") as f:
        pickle.dump(got, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
