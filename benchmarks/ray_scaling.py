"""The same results-table sweep on the local loop and on a Ray cluster of 1 and 2 workers.

    python benchmarks/ray_scaling.py                 # smoke zoo, 2 repetitions
    python benchmarks/ray_scaling.py --profile ci --counts 2 4 --reps 3

One run, on this machine: a Ray cluster of real processes (``ray start``: a head without
CPUs and worker nodes with ``--cpus-per-worker`` CPUs each) inside a network namespace whose
only interface is the loopback (``unshare -n``; the script re-executes itself there and stops
with exit 2 where that is not possible). The sweep is :func:`subboost.experiments.results_table`
over ``--variants`` × ``--counts`` with chapter 3's α grid, one unit per (variant, N).

Phases: (1) one worker node: an untimed warm-up sweep (starts the worker processes, loads the
suite in each), then the local loop and the cluster alternating ``--reps`` times; (2) a second
worker node joins: warm-up, then local and cluster alternating again. Each ratio is the local
median over the cluster median *of the same phase*. The overhead per unit is
(cluster median with one worker − local median) / units, and, separately, the round trip of
an empty unit on warm workers. The tables of every run are checked equal to the local one.
Every process computes with one thread (torch, OpenMP, BLAS), as Ray's 1-CPU workers do.

Output (atomically): ``--out``/ray_scaling.csv, ray_scaling.json, ray_scaling.png and
ray_scaling.md (a fragment the book's page "Run it on a cluster" includes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NAMESPACE_FLAG = "SUBBOOST_LOOPBACK_NAMESPACE"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def load() -> float:
    return os.getloadavg()[0]


def empty_unit(i: int) -> int:
    """A unit that does nothing: its round trip is the executor's own cost."""
    return i


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def render(out: Path, info: dict, rows: list[dict]) -> None:
    """Write ray_scaling.png and the book's fragment ray_scaling.md from the measured rows."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    info = {"units": rows[0]["units"], "cpus_per_worker": rows[0]["cpus_per_worker"], **info}
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    labels = ["local"] + [f"Ray\n{w} worker{'s' if w > 1 else ''}" for w in df.workers]
    a.bar(labels, [df.local_median_s.mean(), *df.ray_median_s], color=["0.6", "C0", "C1"][:len(labels)])
    a.set_ylabel("sweep wall time (s)")
    a.set_title(f"{info['units']} units, {info['profile']} zoo")
    b.plot(df.workers, df.speedup, "o-", label="measured")
    b.plot(df.workers, df.workers * info["cpus_per_worker"], "k--", lw=1, label="ideal")
    b.axhline(1, color="0.6", lw=1)
    b.set_xticks(list(df.workers))
    b.set_xlabel("Ray worker nodes")
    b.set_ylabel("speed-up over the local loop")
    b.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.chmod(tmp, 0o666 & ~_umask())
    plt.close(fig)
    os.replace(tmp, out / "ray_scaling.png")

    one, two = rows[0], rows[-1]
    md = [f"Measured by `benchmarks/ray_scaling.py` on {info['cpu_count']} CPU cores shared with other jobs (load "
          f"average {one['load_before']:.1f} to {two['load_after']:.1f}), {info['profile']} zoo, {info['units']} "
          f"units ({len(info['variants'])} variants × N ∈ {info['counts']}, {len(info['alpha_grid'])} α values "
          f"each), {info['reps']} repetitions per configuration, every table checked equal to the local loop's:", "",
          "| configuration | median sweep time | speed-up over local | warm-up sweep |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| local loop vs Ray, {r['workers']} worker node(s) | {r['local_median_s']:.2f} s vs "
                  f"{r['ray_median_s']:.2f} s | {r['speedup']:.2f}× | {r['warmup_s']:.1f} s |")
    md += ["", f"Two worker nodes against one: {two['speedup'] / one['speedup']:.2f}× (the ratio of the two "
               f"speed-ups, each against the local loop of its own phase). Round trip of an empty unit on warm "
               f"workers, the executor's own cost per unit: {one['empty_unit_round_trip_ms']:.1f} ms; cluster "
               f"with one worker minus local loop, per unit: {one['overhead_per_unit_ms']:.0f} ms. The warm-up "
               f"sweep includes starting the worker processes and loading the suite in each; starting the "
               f"local cluster took {info['cluster_start_s']:.1f} s.", "",
           "![Sweep wall time and speed-up of Ray with 1 and 2 worker nodes over the local loop]"
           "(ray_scaling.png)", ""]
    atomic_write(out / "ray_scaling.md", "\n".join(md).encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke", help="mini zoo profile (default: smoke)")
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 3], help="task counts N (default: 2 3)")
    ap.add_argument("--variants", nargs="+", default=["TA", "TA+SB", "TIES", "TIES+SB", "Consensus", "Consensus+SB"],
                    help="Table 1 variants (labels of subboost.experiments.TABLE1_VARIANTS)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per configuration (default: 2)")
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--empty-units", type=int, default=40, help="empty units for the round-trip time")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    ap.add_argument("--render-only", action="store_true", help="redraw the figure and fragment from --out's JSON")
    args = ap.parse_args(argv)
    if args.render_only:
        saved = json.loads((args.out / "ray_scaling.json").read_text())
        render(args.out, saved["info"], saved["rows"])
        return 0

    if os.environ.get(NAMESPACE_FLAG) != "1":
        from subboost.executor import loopback_namespace_command

        cmd = loopback_namespace_command([sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])])
        if cmd is None:
            print("error: benchmarks/ray_scaling.py needs `unshare -n` and `ip` (root) to keep its Ray cluster "
                  "on the loopback interface", file=sys.stderr)
            return 2
        os.environ[NAMESPACE_FLAG] = "1"
        # one BLAS/OpenMP thread everywhere: Ray gives its 1-CPU workers OMP_NUM_THREADS=1, and
        # the local loop must compute under the same conditions for the ratio to mean anything
        os.environ.update({k: "1" for k in THREAD_VARIABLES})
        os.execvp(cmd[0], cmd)

    import pandas as pd
    import torch

    from subboost import experiments as ex
    from subboost.executor import LocalCluster, RayExecutor

    torch.set_num_threads(1)
    by_label = {v.label: v for v in ex.TABLE1_VARIANTS}
    unknown = [v for v in args.variants if v not in by_label]
    if unknown:
        print(f"error: --variants: unknown {unknown}; choose from {list(by_label)}", file=sys.stderr)
        return 2
    grid = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # chapter 3's α grid
    variants = [by_label[v] for v in args.variants]
    suite = ex.load_suite_from_parameters({"profile": args.profile, "device": "cpu"})
    n_units = len(variants) * len(args.counts)
    env = {"PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}

    def sweep(executor=None) -> tuple[float, pd.DataFrame]:
        t = time.perf_counter()
        table = ex.results_table(suite, args.counts, variants, alpha_grid=grid, progress=False, executor=executor)
        return time.perf_counter() - t, table

    reference = sweep()[1].drop(columns="merge_seconds")
    rows: list[dict] = []
    started = time.perf_counter()
    with LocalCluster(workers=1, cpus_per_worker=args.cpus_per_worker, env=env) as cluster:
        cluster_start_s = time.perf_counter() - started
        with RayExecutor(cluster.address, check=False) as runner:
            for workers in (1, 2):
                if workers == 2:
                    cluster.add_worker()
                load_before = load()
                warm_s, table = sweep(runner)  # worker processes start, suites load
                pd.testing.assert_frame_equal(table.drop(columns="merge_seconds"), reference, check_exact=True)
                times: dict[str, list[float]] = {"local": [], "ray": []}
                for rep in range(args.reps):
                    order = ("local", "ray") if rep % 2 == 0 else ("ray", "local")
                    for which in order:
                        seconds, table = sweep(None if which == "local" else runner)
                        pd.testing.assert_frame_equal(table.drop(columns="merge_seconds"), reference, check_exact=True)
                        times[which].append(seconds)
                t = time.perf_counter()
                assert runner.map(empty_unit, list(range(args.empty_units))) == list(range(args.empty_units))
                empty_s = (time.perf_counter() - t) / args.empty_units
                local_med, ray_med = statistics.median(times["local"]), statistics.median(times["ray"])
                rows.append(dict(workers=workers, cpus_per_worker=args.cpus_per_worker, units=n_units,
                                 local_median_s=local_med, ray_median_s=ray_med, speedup=local_med / ray_med,
                                 warmup_s=warm_s, empty_unit_round_trip_ms=1000 * empty_s,
                                 overhead_per_unit_ms=1000 * (ray_med - local_med) / n_units if workers == 1 else float("nan"),
                                 local_times_s=" ".join(f"{x:.2f}" for x in times["local"]),
                                 ray_times_s=" ".join(f"{x:.2f}" for x in times["ray"]),
                                 load_before=load_before, load_after=load()))
                print(f"{workers} worker(s): local {local_med:.2f} s, ray {ray_med:.2f} s, speed-up "
                      f"{local_med / ray_med:.2f}x, warm-up {warm_s:.1f} s, empty unit {1000 * empty_s:.1f} ms",
                      flush=True)
    df = pd.DataFrame(rows)
    info = dict(profile=args.profile, counts=args.counts, variants=args.variants, alpha_grid=list(grid), units=n_units,
                cpus_per_worker=args.cpus_per_worker,
                reps=args.reps, cluster_start_s=cluster_start_s, cpu_count=os.cpu_count(),
                machine=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                ray=__import__("ray").__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "ray_scaling.csv", df.to_csv(index=False).encode())
    atomic_write(args.out / "ray_scaling.json", json.dumps(dict(info=info, rows=rows), indent=2).encode())

    render(args.out, info, rows)
    print(df.to_string(index=False))
    print(f"written: {args.out / 'ray_scaling.csv'}, .json, .png, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
