"""What running the book on real checkpoints costs, and where the time goes.

    python benchmarks/real_checkpoints.py                     # chapters 01, 03, 04 + the ViT-B/32 rates
    python benchmarks/real_checkpoints.py --chapters 01       # one chapter
    python benchmarks/real_checkpoints.py --skip-chapters     # only the ViT-B/32 rates (a minute)

Three parts, printed as Markdown tables and written (atomically) to
``benchmarks/results/real_checkpoints.json``:

1. **Chapters on a stand-in release.** A stand-in of the public ``tall_masks`` release (the
   tiny random-weight open_clip ViT of ``tests/standin_release.py``, 3 tasks, a few images per
   split) is converted with ``python -m subboost.release convert`` and each chapter is executed
   with the ``smoke`` profile on the CPU, as a user would (``python -m subboost.book execute
   --param checkpoint_root=...``; chapter 3 with ``run_benchmarks=false``, its ViT-B/32 timing
   section being independent of the checkpoints). Reported: wall time, CPU time of the
   runner and its kernel (user + system), the share of the wall time spent in cells that
   evaluate merged models (they call one of :data:`EVALUATING`), and the slowest cells.
2. **Threads on a tiny tower.** The same evaluations of the stand-in with one and with two
   intra-op threads, alternating (why :func:`subboost.experiments.configure_cpu_threads` uses
   one thread for small real towers).
3. **ViT-B/32 rates.** With a random-weight open_clip ViT-B-32 image tower (no download):
   images per second of the evaluation forward pass (batch 128, ``torch.inference_mode``), the
   per-α overhead of putting θ0 + α·Δ into the tower (a merged state dict + ``load_state_dict``
   against :meth:`subboost.evaluate.VisionSuite.load_merged`, in place; alternating, medians), and the seconds to read one
   expert from a safetensors file. A chapter's evaluation cost on real data is then
   (number of merged models × α values × validation images + test images) / that rate.

The machine is shared: the 1-minute load average before and after each row is recorded; read
CPU seconds rather than wall seconds when the load exceeds the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EVALUATING = ("evaluate_variant", "results_table", "ablation_table", "tune_and_test", "evaluate_delta",
              "alpha_sweep", "reference_rows", ".reference(", "merge_and_evaluate", "run_selection",
              "compare_to_random", "alignment_predicts_accuracy", "esm_activations")


def _load() -> float:
    return os.getloadavg()[0]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def prepare_standin(workdir: Path) -> tuple[Path, str]:
    sys.path.insert(0, str(REPO / "tests"))
    from standin_release import MODEL, write_standin

    from subboost.convert import convert

    s = write_standin(workdir / "standin", "tall_masks")
    root = workdir / "converted"
    convert(root, checkpoints=s.root, model=MODEL, base=s.base_file, allow_pickle=True, data=s.authors_data)
    return root, MODEL


def run_chapter(chapter: str, root: Path, model: str, executed: Path, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "subboost.book", "execute", "--profile", "smoke", "--device", "cpu",
           "--chapters", chapter, "--executed-dir", str(executed),
           "--param", f"checkpoint_root={root}", "--param", f"model={model}"]
    if chapter.startswith("03"):
        cmd += ["--param", "run_benchmarks=false"]
    load0, cpu0, t0 = _load(), _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    row = {"chapter": chapter, "status": "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
           "wall_s": wall, "cpu_s": cpu, "load_before": load0, "load_after": _load()}
    nbs = sorted(executed.glob(f"{chapter}*.ipynb"))
    if nbs:
        cells = []
        for c in json.loads(nbs[0].read_text())["cells"]:
            if c["cell_type"] != "code":
                continue
            src = "".join(c["source"])
            dur = float((c.get("metadata", {}).get("papermill", {}) or {}).get("duration") or 0.0)
            first = next((ln for ln in src.splitlines() if ln.strip() and not ln.startswith("#")), "")
            cells.append({"seconds": dur, "evaluates": any(k in src for k in EVALUATING), "first_line": first[:70]})
        total = sum(c["seconds"] for c in cells) or float("nan")
        row["cells_s"] = total
        row["evaluation_share"] = sum(c["seconds"] for c in cells if c["evaluates"]) / total
        row["slowest"] = sorted(cells, key=lambda c: -c["seconds"])[:3]
    if proc.returncode != 0:
        row["stderr_tail"] = proc.stderr[-2000:]
    return row


def thread_counts(root: Path, model: str, repeats: int = 2) -> dict:
    """Seconds of the same evaluations (TA and TA+SB on the stand-in's 3 tasks, 12 α values)
    with 1 and with 2 intra-op threads, alternating, medians."""
    from subboost import experiments as ex
    from subboost.release import load_suite

    before = torch.get_num_threads()
    suite = load_suite(root, model, device="cpu")
    tasks = suite.task_names
    vectors = suite.task_vectors(tasks)
    grid = [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    variants = [v for v in ex.TABLE1_VARIANTS if v.label in ("TA", "TA+SB")]
    for v in variants:  # warm-up: accuracies of the experts, data, untimed
        ex.evaluate_variant(suite, tasks, v, vectors, alpha_grid=grid[:1])
    times: dict[int, list[float]] = {1: [], 2: []}
    load0 = _load()
    try:
        for r in range(repeats):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                for v in variants:
                    ex.evaluate_variant(suite, tasks, v, vectors, alpha_grid=grid)
                times[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    return {"seconds": med, "ratio_2_over_1": med[2] / med[1], "load_before": load0, "load_after": _load()}


@torch.inference_mode()
def vit_b_32_rates(batch: int = 128, repeats: int = 4) -> dict:
    import open_clip
    from safetensors.torch import save_file

    from subboost.evaluate import VisionSuite, merged_state, normalize_batch
    from subboost.release import load_state_dict, quiet_open_clip

    with quiet_open_clip():
        visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    visual(normalize_batch(images[:8]))  # warm-up, untimed
    load0 = _load()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        visual(normalize_batch(images))
        times.append(time.perf_counter() - t0)
    fwd = sorted(times)[len(times) // 2]
    state = {f"visual.{k}": v.clone() for k, v in visual.state_dict().items()}
    delta = {k: torch.randn_like(v) * 1e-3 if v.is_floating_point() else torch.zeros_like(v) for k, v in state.items()}
    suite = VisionSuite(name="vit-b-32", model_name="ViT-B-32", task_names=["t"], load_base=lambda: state,
                        load_expert=lambda t: state, load_head=lambda t: torch.zeros(2, 512), load_data=None,
                        make_visual=lambda: visual, device="cpu")
    routes = {"merged state dict + load_state_dict": lambda a: suite.load_visual(merged_state(suite, delta, a)),
              "in place (VisionSuite.load_merged)": lambda a: suite.load_merged(delta, a)}
    times: dict[str, list[float]] = {k: [] for k in routes}
    for r in range(repeats):  # alternating, the order flips every repetition
        for name in (list(routes) if r % 2 == 0 else list(routes)[::-1]):
            t0 = time.perf_counter()
            routes[name](0.3)
            times[name].append(time.perf_counter() - t0)
    per_alpha = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "expert.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        t0 = time.perf_counter()
        load_state_dict(path)
        read = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
    return {"threads": torch.get_num_threads(), "batch": batch, "images_per_s": batch / fwd,
            "per_alpha_overhead_s": per_alpha, "expert_read_s": read, "expert_mb": size_mb,
            "load_before": load0, "load_after": _load()}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chapters", nargs="+", default=["01", "03", "04"])
    p.add_argument("--skip-chapters", action="store_true")
    p.add_argument("--skip-threads", action="store_true")
    p.add_argument("--skip-rates", action="store_true")
    p.add_argument("--timeout", type=int, default=3600, help="per chapter, seconds")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_checkpoints.json")
    args = p.parse_args(argv)
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "torch": torch.__version__, "python": platform.python_version()},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        if not (args.skip_chapters and args.skip_threads):
            root, model = prepare_standin(Path(tmp))
        if not args.skip_chapters:
            result["chapters"] = [run_chapter(ch, root, model, Path(tmp) / "executed", args.timeout)
                                  for ch in args.chapters]
        if not args.skip_threads:
            result["threads"] = thread_counts(root, model)
    if not args.skip_rates:
        result["vit_b_32"] = vit_b_32_rates()
    _atomic_write(args.out, json.dumps(result, indent=2))
    print(f"machine: {result['machine']['cpus']} CPUs, torch {result['machine']['torch']}, {result['date']}")
    if "chapters" in result:
        print("\n| chapter | status | wall (s) | CPU (s) | in evaluating cells | slowest cell | load before/after |")
        print("|---|---|---|---|---|---|---|")
        for r in result["chapters"]:
            slow = r.get("slowest", [{}])[0]
            print(f"| {r['chapter']} | {r['status']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
                  f"{100 * r.get('evaluation_share', float('nan')):.0f}% | "
                  f"`{slow.get('first_line', '')}` ({slow.get('seconds', float('nan')):.0f} s) | "
                  f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    if "threads" in result:
        t = result["threads"]
        print(f"\nStand-in evaluations (TA, TA+SB, 12 α, 3 tasks), load {t['load_before']:.1f}/{t['load_after']:.1f}: "
              f"1 thread {t['seconds'][1]:.1f} s, 2 threads {t['seconds'][2]:.1f} s "
              f"(2 threads take {t['ratio_2_over_1']:.1f}x the time of 1)")
    if "vit_b_32" in result:
        v = result["vit_b_32"]
        print(f"\nViT-B/32 image tower on this CPU ({v['threads']} threads, load {v['load_before']:.1f}/{v['load_after']:.1f}): "
              f"{v['images_per_s']:.1f} images/s (batch {v['batch']}); reading one {v['expert_mb']:.0f} MB expert "
              f"{v['expert_read_s']:.2f} s; per-α overhead (median): "
              + "; ".join(f"{k} {t:.2f} s" for k, t in v["per_alpha_overhead_s"].items()))
    print(f"\nwritten: {args.out}")
    return 0 if all(r["status"] == "ok" for r in result.get("chapters", [])) else 1


if __name__ == "__main__":
    raise SystemExit(main())
