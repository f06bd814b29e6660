"""Side-by-side timings of subboost's fast routes against their references.

    python benchmarks/run.py            # full run (several minutes on 2 CPU cores)
    python benchmarks/run.py --quick    # book-chapter run (a few minutes on 2 CPU cores)

Three sections (and a calibration), each timed reference-vs-ours **in one run, alternating** (the order flips every
repetition), reporting medians, the ratio of medians and the largest relative error:

1. ``sb``: Subspace Boosting, every route (``svd`` = paper Alg. 1 verbatim, ``svd-tall``,
   ``gram``, ``polar``, ``auto``) in one alternating loop per input class: (a) the mini zoo's
   Task-Arithmetic task vectors (N = 8 and 20 from the ``ci`` zoo when it is built in
   $SUBBOOST_ZOO_ROOT, else the ``smoke`` zoo's 3 tasks; real spectra, small shapes), (b) their
   spectra transplanted to the ViT-B/32 block shapes (in_proj 2304×768, out_proj 768×768,
   c_fc 3072×768, c_proj 768×3072; random orthonormal singular vectors, log σ interpolated),
   (c) σ = 1e-3·[40, 25, 12, 2·j^(−p) …] on those shapes, p set for κ = 1e1 … 1e5. Per class:
   median wall and CPU seconds of each route, auto's ratio to the fastest fixed route, the
   routes auto took, each route's largest relative error against Alg. 1 in float64.
   ``--sections calibrate`` fits the constants of :class:`subboost.boost.CostModel`.
2. ``hogsvd``: S_π of the HO-GSVD (paper Eq. 31-32) for N = 8, 14, 20 task matrices of
   768 × 768: :func:`subboost.hogsvd.s_pi_pairwise` (N(N−1) products) against
   :func:`subboost.hogsvd.s_pi` (Σ_{i≠j} D_i D_j⁻¹ = (Σ D_i)(Σ D_j⁻¹) − N·I; on the CPU
   LAPACK's symmetric kernels: ``syrk`` Grams, ``potrf`` + ``potri`` inverses, upper triangles
   only), and in the same loop its ``route="torch"`` (batched torch kernels, the GPU route).
3. ``stream``: TA + SB merge of N ViT-B/32-size experts (synthetic safetensors checkpoints of
   the visual tower, 351 MB each, written to ``--workdir``): ``subboost merge`` (streaming)
   against loading every checkpoint (``load_state_dict`` + ``merge`` + ``apply_task_vector``),
   each in its own process, peak RSS from ``/proc/self/status`` (VmHWM). The load-everything approach is run
   for small N only (it needs ≈ 2 × N models of memory) and extrapolated linearly.

The table is printed and written (atomically) as CSV and JSON to ``--out``
(``benchmarks/results`` by default), with the machine, the load average before and after
each section, and the versions. Timings on a shared machine are noisy: read the load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from subboost.boost import boost_singular_values  # noqa: E402
from subboost.io import atomic_path  # noqa: E402

VIT_B32_BLOCK = {
    "attn.in_proj_weight": (2304, 768),
    "attn.out_proj.weight": (768, 768),
    "mlp.c_fc.weight": (3072, 768),
    "mlp.c_proj.weight": (768, 3072),
}
VIT_B32_LAYERS = 12


# ----------------------------------------------------------------------------- helpers


def load() -> float:
    """1-minute load average."""
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                python=platform.python_version(), platform=platform.platform(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued kernels on ``device`` (a no-op on the CPU), so timings cover the work."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def alternate_many(fns: dict[str, Callable[[], Any]], reps: int, device: torch.device = torch.device("cpu"),
                   cpu_times: dict[str, list[float]] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time every function ``reps`` times, rotating which goes first each repetition (and
    reversing the order every other one); returns the seconds and the last result per name.
    On an accelerator every function first runs once untimed (library and kernel start-up) and
    each timing ends with a device synchronisation. ``cpu_times``, when given, receives the
    process CPU seconds of each call: with one torch thread on a CPU shared with other jobs,
    the work itself, without the time spent waiting for a core."""
    sync = synchronizer(device)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    results: dict[str, Any] = {}
    if device.type != "cpu":
        for name in names:
            fns[name]()
        sync()
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        if rep % 2:
            order.reverse()
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    if cpu_times is not None:
        cpu_times.update(cpu)
    return times, results


def alternate(ref: Callable[[], Any], ours: Callable[[], Any], reps: int,
              device: torch.device = torch.device("cpu")) -> tuple[list[float], list[float], Any, Any]:
    """Time ``ref`` and ``ours`` ``reps`` times each, alternating which goes first; returns
    both lists of seconds and the last result of each."""
    times, results = alternate_many({"ref": ref, "ours": ours}, reps, device)
    return times["ref"], times["ours"], results["ref"], results["ours"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    nb = float(b.double().norm())
    return float((a.double() - b.double()).norm()) / nb if nb > 0 else float((a.double()).norm())


# ----------------------------------------------------------------------------- 1. SB

SB_ROUTES = ("svd", "svd-tall", "gram", "polar", "auto")
"""Routes timed side by side on every SB input class (``svd`` is paper Alg. 1 verbatim)."""


def realistic_matrix(m: int, n: int, gen: torch.Generator, n_tasks: int = 20) -> torch.Tensor:
    """A merged (Task Arithmetic) task matrix of ``n_tasks`` experts, Δm = Σ_t (C + U_t + E_t):

    - C, shared by every task (adds up coherently): rank 8, singular values ∝ 1/k (power law);
    - U_t, task-specific: rank 4 in random directions, singular values 0.5/k;
    - E_t, SGD-like noise: i.i.d. Gaussian with bulk edge 0.3 (Marchenko–Pastur).

    The sum has a few dominant directions (stable rank ≈ 2-3), 80 weaker task directions and a
    noise bulk reaching down to ~1e-4 of the top singular value for square matrices: the
    low-rank, heavy-tailed spectra the paper measures on real task vectors (its Fig. 2).
    Scaled by 1e-3 (fine-tuning updates are small), float32.
    """
    f64 = torch.float64

    def orth(rows: int, cols: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=f64))[0]

    k = torch.arange(1, 9, dtype=f64)
    out = n_tasks * (orth(m, 8) * (1.0 / k)) @ orth(n, 8).T
    ku = torch.arange(1, 5, dtype=f64)
    for _ in range(n_tasks):
        out += (orth(m, 4) * (0.5 / ku)) @ orth(n, 4).T
    sigma = 0.3 / (math.sqrt(m) + math.sqrt(n))
    out += math.sqrt(n_tasks) * sigma * torch.randn(m, n, generator=gen, dtype=f64)
    return (1e-3 * out).to(torch.float32)


def spectrum_matrix(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U (m × k), V (n × k), k = min(m, n), as float32."""
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    return ((u * s.to(torch.float64)[:k]) @ v.T).to(torch.float32)


def synthetic_spectrum(k: int, kappa: float) -> torch.Tensor:
    """σ = 1e-3·[40, 25, 12, 2·j^(−p) for j = 1 … k − 3]: three strong directions over a
    power-law tail, p chosen so that σ_max/σ_min = ``kappa``; below κ ≈ 40 the tail flattens
    to p = 0.1 and the head shrinks instead."""
    tail_len = k - 3
    p = math.log(kappa / 20.0) / math.log(tail_len)
    head = torch.tensor([40.0, 25.0, 12.0], dtype=torch.float64)
    if p < 0.1:
        p = 0.1
        head = head * kappa * 2.0 * tail_len ** -p / 40.0
    tail = 2.0 * torch.arange(1, tail_len + 1, dtype=torch.float64) ** -p
    return 1e-3 * torch.cat([head, tail]).sort(descending=True).values


def transplant_spectrum(s: torch.Tensor, k: int) -> torch.Tensor:
    """A spectrum of ``k`` values with the shape of ``s`` (descending, nonzero): log σ linearly
    interpolated over the relative index i/(len − 1), so the head, the decay and κ carry over."""
    s = s.to(torch.float64).clamp(min=float(s.max()) * 1e-12)
    x = torch.linspace(0.0, 1.0, len(s), dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    pos = torch.searchsorted(x, t).clamp(1, len(s) - 1)
    w = (t - x[pos - 1]) / (x[pos] - x[pos - 1])
    logs = torch.log(s)
    return torch.exp(logs[pos - 1] * (1 - w) + logs[pos] * w)


def zoo_ta_matrices(counts: list[int]) -> tuple[str, dict[int, dict[str, torch.Tensor]]]:
    """Task Arithmetic sums Σ_t Δ_t of the mini zoo's first N tasks (block matrices only), for
    each N in ``counts`` the zoo has: the ``ci`` zoo where it is built in $SUBBOOST_ZOO_ROOT,
    else ``smoke`` (3 tasks). Returns the profile and {N: {key: matrix}}."""
    from subboost.taskvector import LAYER_TYPES, select_block_keys
    from subboost.zoo import load_suite

    suite, profile = None, None
    for profile in ("ci", "smoke"):
        try:
            suite = load_suite(profile, build_if_missing=False, progress=False, device="cpu")
            break
        except FileNotFoundError:
            continue
    if suite is None:
        raise FileNotFoundError("no mini zoo is built (python -m subboost.zoo build --profile smoke)")
    names = list(suite.task_names)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for count in sorted({min(c, len(names)) for c in counts}):
        vectors = suite.task_vectors(names[:count])
        keys = select_block_keys(next(iter(vectors.values())), LAYER_TYPES, False)
        summed = {k: sum(v[k].to(torch.float32) for v in vectors.values()) for k in keys}
        out[count] = {k: m for k, m in summed.items() if bool(m.any())}  # the frozen text tower is zero
    return profile, out


def sb_classes(counts: list[int], kappas: list[float], layers: int = 1, seed: int = 0) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The SB input classes: (a) the zoo's TA task vectors, (b) their spectra transplanted to
    ViT-B/32 shapes (per matrix type, from the zoo's last block), (c) synthetic power-law
    spectra at each κ in ``kappas`` with ViT-B/32 shapes; ``layers`` ViT-B/32 blocks each."""
    classes: list[tuple[str, dict[str, torch.Tensor]]] = []
    gen = torch.Generator().manual_seed(seed)
    try:
        profile, zoo = zoo_ta_matrices(counts)
    except FileNotFoundError as err:
        print(f"skipping the zoo classes: {err}", file=sys.stderr)
        zoo, profile = {}, None
    for count, mats in zoo.items():
        shape = next(iter(mats.values())).shape
        classes.append((f"(a) zoo {profile} TA N={count}: {len(mats)} matrices, min side {min(shape)}", mats))
    for count, mats in zoo.items():
        last: dict[str, torch.Tensor] = {}
        for key, m in mats.items():
            last[key.split("resblocks.", 1)[1].split(".", 1)[1]] = torch.linalg.svdvals(m.double())
        tv = {}
        for l in range(layers):
            for name, shape in VIT_B32_BLOCK.items():
                s = last.get(name)
                if s is None:
                    continue
                tv[f"visual.transformer.resblocks.{l}.{name}"] = spectrum_matrix(*shape, transplant_spectrum(s, min(shape)), gen)
        kap = max(float(torch.linalg.svdvals(m.double()).max() / torch.linalg.svdvals(m.double()).min()) for m in tv.values())
        classes.append((f"(b) zoo N={count} spectra on ViT-B/32 shapes (κ ≤ {kap:.0e})", tv))
    for kappa in kappas:
        tv = {f"visual.transformer.resblocks.{l}.{name}": spectrum_matrix(*shape, synthetic_spectrum(min(shape), kappa), gen)
              for l in range(layers) for name, shape in VIT_B32_BLOCK.items()}
        classes.append((f"(c) power-law tail, κ = {kappa:.0e}, ViT-B/32 shapes", tv))
    return classes


def bench_sb(reps: int, betas: list[float], truth: bool, device: torch.device = torch.device("cpu"),
             counts: tuple[int, ...] = (8, 20), kappas: tuple[float, ...] = (1e1, 1e2, 1e3, 1e4, 1e5),
             layers: int = 1, kinds: str = "abc") -> list[dict]:
    """Every route of :data:`SB_ROUTES` on every input class of :func:`sb_classes`, in one
    alternating loop per class and β; medians, auto's ratio to the fastest fixed route, the
    routes auto took and each route's largest relative error against Alg. 1 in float64.
    ``kinds``: which classes, of "a" (zoo), "b" (transplanted), "c" (synthetic κ)."""
    from subboost.boost import boost_matrices

    rows = []
    for label, tv in sb_classes(list(counts), list(kappas), layers):
        if label[1] not in kinds:
            continue
        mats = [v.to(device) for v in tv.values()]
        # small matrices take milliseconds: repeat them 10 times as often (the medians settle)
        class_reps = reps * 10 if sum(v.numel() for v in tv.values()) < 1_000_000 else reps
        truth_cache: dict[float, list[torch.Tensor]] = {}
        for beta in betas:
            l0 = load()
            fns = {r: (lambda r=r: boost_matrices(mats, beta, route=r)) for r in SB_ROUTES}
            cpu: dict[str, list[float]] = {}
            times, results = alternate_many(fns, class_reps, device, cpu)
            med = {r: statistics.median(t) for r, t in times.items()}
            med_cpu = {r: statistics.median(t) for r, t in cpu.items()}
            best_cpu = min((r for r in SB_ROUTES if r != "auto"), key=lambda r: med_cpu[r])
            fixed = [r for r in SB_ROUTES if r != "auto"]
            best = min(fixed, key=lambda r: med[r])
            used = {}
            for _, _, u in results["auto"]:
                used[u] = used.get(u, 0) + 1
            row = dict(
                section="sb", device=str(device), benchmark=f"SB β={beta:g}, {label}", matrices=len(mats),
                reference="route=svd (Alg. 1, float32 SVD)",
                ours="route=auto (" + ", ".join(f"{n} {u}" for u, n in used.items()) + ")",
                ref_median_s=med["svd"], ours_median_s=med["auto"], ratio=med["svd"] / med["auto"],
                best_fixed_route=best, auto_over_best=med[best] / med["auto"], reps=class_reps,
                threads=torch.get_num_threads(), best_fixed_route_cpu=best_cpu,
                auto_over_best_cpu=med_cpu[best_cpu] / med_cpu["auto"], ratio_cpu=med_cpu["svd"] / med_cpu["auto"],
                max_rel_err=max(rel(o, r) for (o, _, _), (r, _, _) in zip(results["auto"], results["svd"])),
                load_before=l0, load_after=load(),
            )
            for r in SB_ROUTES:
                key = r.replace("-", "_")
                row[f"{key}_median_s"] = med[r]
                row[f"{key}_cpu_median_s"] = med_cpu[r]
                row[f"{key}_times_s"] = [round(t, 4) for t in times[r]]
            if truth:
                if beta not in truth_cache:
                    truth_cache[beta] = []
                    for m in mats:
                        u, s, vh = torch.linalg.svd(m.double().cpu(), full_matrices=False)
                        truth_cache[beta].append((u * boost_singular_values(s, beta)) @ vh)
                for r in SB_ROUTES:
                    row[f"{r.replace('-', '_')}_max_rel_err_vs_float64"] = max(
                        rel(o.cpu(), t) for (o, _, _), t in zip(results[r], truth_cache[beta]))
                    row[f"{r.replace('-', '_')}_routes"] = ",".join(sorted({u for _, _, u in results[r]}))
            rows.append(row)
            print_sb_row(row, flush=True)
    return rows


def print_sb_row(r: dict, flush: bool = False) -> None:
    meds = " ".join(f"{x}={r[x.replace('-', '_') + '_median_s']:.3f}" for x in SB_ROUTES)
    cpus = " ".join(f"{x}={r[x.replace('-', '_') + '_cpu_median_s']:.3f}" for x in SB_ROUTES)
    errs = " ".join(f"{x}={r.get(x.replace('-', '_') + '_max_rel_err_vs_float64', float('nan')):.0e}" for x in SB_ROUTES)
    print(f"{r['benchmark']}\n    medians s: {meds}; svd/auto {r['ratio']:.2f}x, auto/best({r['best_fixed_route']}) "
          f"{r['auto_over_best']:.2f}; {r['ours']}; load {r['load_before']:.1f}-{r['load_after']:.1f}\n"
          f"    CPU s: {cpus}; svd/auto {r['ratio_cpu']:.2f}x, auto/best({r['best_fixed_route_cpu']}) "
          f"{r['auto_over_best_cpu']:.2f}\n"
          f"    max rel err vs float64: {errs}", flush=flush)


def calibrate(reps: int = 3) -> dict[str, float]:
    """Times the kernels of :class:`subboost.boost.CostModel` at ViT-B/32 sizes (and each
    route's fixed cost on a 64 × 64 matrix) in CPU seconds with torch's current thread count,
    and fits its constants."""
    from subboost.boost import boost_matrices

    def med(f: Callable[[], Any], inner: int = 1) -> float:
        f()
        ts = []
        for _ in range(reps):
            t = time.process_time()  # CPU seconds: robust against other jobs on a shared machine
            for _ in range(inner):
                f()
            ts.append((time.process_time() - t) / inner)
        return statistics.median(ts)

    gen = torch.Generator().manual_seed(0)
    tall = torch.randn(3072, 768, generator=gen)
    sq = torch.randn(768, 768, generator=gen)
    t_tall = med(lambda: torch.linalg.svd(tall, full_matrices=False))
    t_wide = med(lambda: torch.linalg.svd(tall.T, full_matrices=False))
    t_sq = med(lambda: torch.linalg.svd(sq, full_matrices=False))
    k = 768
    # t = a·m·k² + b·k³ through the tall (m = 3072) and square (m = 768) SVDs
    a = (t_tall - t_sq) / ((3072 - 768) * k * k)
    b = (t_sq - a * 768 * k * k) / k ** 3
    t64 = tall.double()
    g = t64.T @ t64
    out = dict(
        svd_mk2=a, svd_k3=max(b, 0.0), svd_wide=t_wide / t_tall,
        gemm32=med(lambda: tall @ sq) / (3072 * k * k),
        gemm64=med(lambda: t64 @ g) / (3072 * k * k),
        eigh64=med(lambda: torch.linalg.eigh(g)) / k ** 3,
        chol64=med(lambda: torch.cholesky_inverse(torch.linalg.cholesky(g))) / k ** 3,
        f64=med(lambda: torch.linalg.svd(sq.double(), full_matrices=False)) / t_sq,
    )
    small = [torch.randn(64, 64, generator=gen) * torch.logspace(0, -2, 64)]
    for route in ("svd", "gram", "polar"):
        out[f"{route}_call"] = med(lambda: boost_matrices(small, 0.0, route=route), inner=20)
    return out



# ----------------------------------------------------------------------------- 2. HO-GSVD


def bench_hogsvd(reps: int, counts: list[int], n: int = 768, device: torch.device = torch.device("cpu")) -> list[dict]:
    """S_π at N = ``counts``: the pairwise reference against ``s_pi`` (route ``auto``: LAPACK's
    symmetric kernels on the CPU) and, in the same alternating loop, ``s_pi(route="torch")``
    (batched torch kernels, the route a GPU takes), reported in the same row."""
    from subboost import hogsvd

    rows = []
    gen = torch.Generator().manual_seed(1)
    pool = [realistic_matrix(n, n, gen, n_tasks=1).double().to(device) for _ in range(max(counts))]
    for count in counts:
        mats = pool[:count]
        l0 = load()
        times, results = alternate_many({
            "ref": lambda: hogsvd.s_pi_pairwise(mats, 1e-2),
            "ours": lambda: hogsvd.s_pi(mats, 1e-2),
            "torch": lambda: hogsvd.s_pi(mats, 1e-2, route="torch"),
        }, reps, device)
        ref, ours = results["ref"].cpu(), results["ours"].cpu()
        ev_ref = torch.sort(torch.linalg.eigvals(ref).real).values
        ev_ours = torch.sort(torch.linalg.eigvals(ours).real).values
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(
            section="hogsvd", device=str(device), benchmark=f"HO-GSVD S_π, N={count}, n={n} (float64)",
            reference="s_pi_pairwise (N inverses, N(N−1) products)",
            ours="s_pi (identity; syrk Grams, potrf + potri inverses, upper triangles)",
            ref_median_s=med["ref"], ours_median_s=med["ours"], ratio=med["ref"] / med["ours"], reps=reps,
            max_rel_err=rel(ours, ref), eigenvalue_max_rel_err=float(((ev_ours - ev_ref).abs() / ev_ref.abs()).max()),
            torch_route_median_s=med["torch"], torch_route_ratio=med["ref"] / med["torch"],
            torch_route_max_rel_err=rel(results["torch"].cpu(), ref),
            ref_times_s=[round(t, 4) for t in times["ref"]], ours_times_s=[round(t, 4) for t in times["ours"]],
            torch_route_times_s=[round(t, 4) for t in times["torch"]],
            load_before=l0, load_after=load(),
        ))
    return rows


# ----------------------------------------------------------------------------- 3. streaming


def vit_b32_visual_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an open_clip ViT-B/32 visual tower (87.8 M parameters, 351 MB)."""
    w = 768
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (w,), "visual.positional_embedding": (50, w), "visual.proj": (w, 512),
        "visual.conv1.weight": (w, 3, 32, 32), "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
    }
    for l in range(VIT_B32_LAYERS):
        p = f"visual.transformer.resblocks.{l}."
        shapes.update({
            p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
            p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
            p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
            p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,),
        })
    shapes.update({"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,)})
    return shapes


def write_checkpoints(folder: Path, n_experts: int) -> tuple[Path, list[Path]]:
    """Base + ``n_experts`` experts (safetensors). Expert = base + shared rank-2 update +
    task rank-2 update (block matrices) + 1e-4 Gaussian noise. Reused if present."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = vit_b32_visual_shapes()
    base_path = folder / "base.safetensors"
    experts = [folder / f"expert{i:02d}.safetensors" for i in range(n_experts)]
    gen = torch.Generator().manual_seed(123)
    base = {k: 0.02 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    if not base_path.exists():
        save_file(base, base_path)
    shared = torch.Generator().manual_seed(7)
    common = {k: (torch.randn(s[0], 2, generator=shared), torch.randn(2, s[1], generator=shared))
              for k, s in shapes.items() if len(s) == 2 and "resblocks" in k}
    for i, path in enumerate(experts):
        if path.exists():
            continue
        g = torch.Generator().manual_seed(1000 + i)
        sd = {}
        for k, value in base.items():
            delta = 1e-4 * torch.randn(value.shape, generator=g)
            if k in common:
                a, b = common[k]
                delta += 2e-4 * (a @ b) + 1e-4 * (torch.randn(a.shape, generator=g) @ torch.randn(b.shape, generator=g))
            sd[k] = value + delta
        tmp = path.with_suffix(".tmp")
        save_file(sd, tmp)
        os.replace(tmp, path)
        del sd
    return base_path, experts


# Peak RSS is read from /proc/self/status (VmHWM, this process' own address space):
# getrusage's ru_maxrss survives execve on Linux and so reports the forking parent's RSS.
_PEAK = textwrap.dedent("""
    def peak_kib():
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
""")

_CLI_RUNNER = _PEAK + textwrap.dedent("""
    import sys, time
    from subboost.cli import main
    t = time.perf_counter()
    rc = main(sys.argv[1:])
    sys.stderr.write(f"\\nBENCH {peak_kib()} {time.perf_counter() - t}\\n")
    sys.exit(rc)
""")

_LOAD_ALL_RUNNER = _PEAK + textwrap.dedent("""
    import sys, time
    t = time.perf_counter()
    from subboost.io import load_state_dict, save_state_dict
    from subboost.merging import merge
    from subboost.taskvector import apply_task_vector, task_vectors
    out, base_path, *expert_paths = sys.argv[1:]
    base = load_state_dict(base_path)
    experts = {p: load_state_dict(p) for p in expert_paths}
    vectors = list(task_vectors(base, experts).values())
    delta = merge(vectors, "ta", boost_beta=0.0)
    save_state_dict(apply_task_vector(base, delta, 0.3), out)
    sys.stderr.write(f"\\nBENCH {peak_kib()} {time.perf_counter() - t}\\n")
""")

_BASELINE_RUNNER = _PEAK + "import sys, torch, subboost.cli, subboost.streaming\nsys.stderr.write(f'BENCH {peak_kib()} 0\\n')"


def _measure(code: str, args: list[str]) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter (with this process' torch thread count); returns
    (peak RSS in GiB, seconds)."""
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env)
    line = [x for x in proc.stderr.splitlines() if x.startswith("BENCH ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"benchmark subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    _, kib, secs = line[-1].split()
    return int(kib) / 2**20, float(secs)


def bench_stream(n_experts: int, load_all_counts: list[int], workdir: Path, keep: bool) -> list[dict]:
    from safetensors.torch import load_file

    rows = []
    made = not workdir.exists()
    try:
        t0 = time.perf_counter()
        base, experts = write_checkpoints(workdir, max([n_experts] + load_all_counts))
        write_s = time.perf_counter() - t0
        size_gb = sum(p.stat().st_size for p in [base] + experts[:n_experts]) / 2**30
        baseline, _ = _measure(_BASELINE_RUNNER, [])
        common = dict(section="stream", baseline_rss_gib=baseline, checkpoint_gib=experts[0].stat().st_size / 2**30)
        l0 = load()
        out = workdir / "merged_stream.safetensors"
        rss, secs = _measure(_CLI_RUNNER, ["merge", "--base", str(base), "--experts", *map(str, experts[:n_experts]),
                                           "--method", "ta", "--boost", "0", "--alpha", "0.3", "--output", str(out),
                                           "--overwrite", "--quiet"])
        rows.append(dict(common, benchmark=f"merge TA+SB, {n_experts} ViT-B/32-size experts ({size_gb:.1f} GiB on disk)",
                         approach="streaming: subboost merge (incl. SHA-256 of the inputs)", experts=n_experts,
                         peak_rss_gib=rss, seconds=secs, load_before=l0, load_after=load(),
                         note=f"checkpoints written in {write_s:.0f} s"))
        fits = []
        for count in load_all_counts:
            l0 = load()
            out_all = workdir / f"merged_all{count}.safetensors"
            rss_all, secs_all = _measure(_LOAD_ALL_RUNNER, [str(out_all), str(base), *map(str, experts[:count])])
            fits.append((count, rss_all, secs_all))
            row = dict(common, benchmark=f"merge TA+SB, {count} experts", approach="load everything (library)",
                       experts=count, peak_rss_gib=rss_all, seconds=secs_all, load_before=l0, load_after=load())
            out_s = workdir / f"merged_stream{count}.safetensors"
            rss_s, secs_s = _measure(_CLI_RUNNER, ["merge", "--base", str(base), "--experts", *map(str, experts[:count]),
                                                   "--method", "ta", "--boost", "0", "--alpha", "0.3", "--output",
                                                   str(out_s), "--overwrite", "--quiet", "--no-hash"])
            a, b = load_file(out_all), load_file(out_s)
            row["max_rel_err_stream_vs_load_all"] = max(rel(b[k], a[k]) for k in a)
            rows.append(row)
            rows.append(dict(common, benchmark=f"merge TA+SB, {count} experts", approach="streaming (no hashing)",
                             experts=count, peak_rss_gib=rss_s, seconds=secs_s))
            out_all.unlink()
            out_s.unlink()
        if len(fits) >= 2 and n_experts > fits[-1][0]:
            (n0, r0, s0), (n1, r1, s1) = fits[0], fits[-1]
            slope, slope_s = (r1 - r0) / (n1 - n0), (s1 - s0) / (n1 - n0)
            rows.append(dict(common, benchmark=f"merge TA+SB, {n_experts} experts",
                             approach=f"load everything, extrapolated from N={n0}, {n1}", experts=n_experts,
                             peak_rss_gib=r1 + slope * (n_experts - n1), seconds=s1 + slope_s * (n_experts - n1),
                             note=f"{slope:.2f} GiB per expert"))
    finally:
        if not keep and made:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- report


def print_table(rows: list[dict]) -> None:
    for r in rows:
        if r.get("section") == "sb":
            print_sb_row(r)
    timed = [r for r in rows if "ratio" in r and r.get("section") != "sb"]
    if timed:
        print(f"{'benchmark':58} {'ref med s':>10} {'ours med s':>10} {'ratio':>7} {'max rel err':>11} {'load':>9}")
        for r in timed:
            print(f"{r['benchmark']:58} {r['ref_median_s']:10.3f} {r['ours_median_s']:10.3f} {r['ratio']:6.2f}x "
                  f"{r['max_rel_err']:11.2e} {r['load_before']:4.1f}-{r['load_after']:<4.1f}")
            extra = {k: r[k] for k in ("max_rel_err_ref_vs_float64", "max_rel_err_ours_vs_float64", "eigenvalue_max_rel_err") if k in r}
            if extra:
                print("    " + ", ".join(f"{k} {v:.2e}" for k, v in extra.items()) + f"; ours: {r['ours']}")
            if "torch_route_ratio" in r:
                print(f"    route='torch' (batched torch kernels): {r['torch_route_median_s']:.3f} s, "
                      f"{r['torch_route_ratio']:.2f}x, max rel err {r['torch_route_max_rel_err']:.2e}")
    mem = [r for r in rows if "peak_rss_gib" in r]
    if mem:
        print(f"\n{'merge':40} {'approach':58} {'peak RSS GiB':>12} {'seconds':>8}")
        for r in mem:
            print(f"{r['benchmark'][:40]:40} {r['approach'][:58]:58} {r['peak_rss_gib']:12.2f} {r['seconds']:8.1f}")
        print(f"(a bare 'import subboost.cli' peaks at {mem[0]['baseline_rss_gib']:.2f} GiB: torch's libraries)")


def write_results(rows: list[dict], info: dict, out: Path, stem: str) -> tuple[Path, Path]:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    flat = [{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
    with atomic_path(csv_path) as tmp:
        pd.DataFrame(flat).to_csv(tmp, index=False)
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(dict(machine=info, rows=rows), indent=1, default=str) + "\n")
    return csv_path, json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 repetitions, β = 0 only, N = 8 and 20 for HO-GSVD, 4 streamed experts (a few minutes)")
    parser.add_argument("--sections", nargs="+", choices=["sb", "hogsvd", "stream", "calibrate"],
                        default=["sb", "hogsvd", "stream"],
                        help="calibrate: time the kernels of subboost.boost.CostModel and print its constants")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 5, quick 3)")
    parser.add_argument("--betas", type=float, nargs="+", default=None, help="SB β values (default 0 0.02; quick: 0)")
    parser.add_argument("--kappas", type=float, nargs="+", default=None,
                        help="κ of the synthetic SB classes (default 1e1 1e2 1e3 1e4 1e5; quick: 1e1 1e3 1e5)")
    parser.add_argument("--sb-classes", default="abc",
                        help="SB input classes: a (zoo TA), b (zoo spectra on ViT-B/32 shapes), c (κ sweep)")
    parser.add_argument("--zoo-counts", type=int, nargs="+", default=[8, 20],
                        help="N of the zoo's TA task vectors (capped at the zoo's task count)")
    parser.add_argument("--no-truth", action="store_true", help="skip the float64 SVD accuracy check")
    parser.add_argument("--experts", type=int, default=None, help="streamed experts (default 20, quick 4)")
    parser.add_argument("--load-all", type=int, nargs="+", default=None, help="N for the load-everything runs (default 2 4)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "subboost-bench",
                        help="where the synthetic checkpoints go (removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    parser.add_argument("--name", default=None, help="file stem of the results (default timings or timings_quick)")
    parser.add_argument("--device", default="cpu",
                        help="device for the sb and hogsvd sections (e.g. cuda, cuda:1); stream always runs on the CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a machine shared with other jobs, "
                             "1 avoids stalls of multi-threaded LAPACK calls)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__})")
    reps = args.reps or (3 if args.quick else 5)
    betas = args.betas or ([0.0] if args.quick else [0.0, 0.02])
    info = machine()
    info.update(load_start=load(), quick=args.quick, reps=reps, device=str(device))
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['threads']} threads), "
          f"load {info['load_start']:.2f}", flush=True)
    rows: list[dict] = []
    if "calibrate" in args.sections:
        fitted = calibrate(reps)
        info["calibration"] = fitted
        print(f"CostModel fitted with {torch.get_num_threads()} threads, load {load():.2f}: "
              + ", ".join(f"{k}={v:.2g}" for k, v in fitted.items()), flush=True)
    if "sb" in args.sections:
        kappas = args.kappas or ([1e1, 1e3, 1e5] if args.quick else [1e1, 1e2, 1e3, 1e4, 1e5])
        rows += bench_sb(reps, betas, truth=not args.no_truth, device=device, counts=tuple(args.zoo_counts),
                         kappas=tuple(kappas), kinds=args.sb_classes)
    if "hogsvd" in args.sections:
        counts = [8, 20] if args.quick else [8, 14, 20]
        rows += bench_hogsvd(max(2, reps - 1) if args.quick else reps, counts, device=device)
        print_table([r for r in rows if r["section"] == "hogsvd"])
    if "stream" in args.sections:
        n = args.experts or (4 if args.quick else 20)
        load_all = args.load_all or [2, 4]
        rows += bench_stream(n, [c for c in load_all if c <= max(n, 4)], args.workdir, args.keep)
    info["load_end"] = load()
    print()
    print_table(rows)
    csv_path, json_path = write_results(rows, info, args.out, args.name or ("timings_quick" if args.quick else "timings"))
    print(f"\nwrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
