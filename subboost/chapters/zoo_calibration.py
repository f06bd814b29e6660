"""Appendix, ``notebooks/06_zoo_calibration.md`` — the mini zoo against real task vectors,
and whether the verdicts depend on it.

Two mini zoos share one pretrained base and differ only in their experts' fine-tuning recipe:
*v2* (the book's zoo until the calibration; AdamW lr 5e-4, batch 64, weight decay 0.01) and
*v3* (the book's zoo now; the recipe moved toward the published one of the real checkpoints).
This module measures both on the calibration quantities of :mod:`subboost.calibration`
(published values with sources; the introduction shows the table) and recomputes six
headline verdicts of the book on each, with the same settings on both:

- rank collapse (paper Sec. 3, Fig. 2, 7; claim ``rank-collapse``) and whether the falling
  stable rank of TA merges goes with falling accuracy (Fig. 3; claim ``rank-accuracy``),
- SB's gain over Task Arithmetic (Sec. 5, Table 1; claim ``sb-improves``, TA only here) and
  whether SB and LiNeS are complementary (Table 1; claim ``sb-lines``),
- robustness to β (Tables 3a, 7; claim ``beta``),
- HO-GSVD expert selection against random draws (Sec. 4.2, Table 5; claim ``selection-pool``).

Every verdict comes from the claim's rule in :mod:`subboost.claims`, so a changed verdict is a
property of the zoo, not of the rule. With more than one expert seed (parameter
``expert_seeds``), the book's zoo is fine-tuned again from the same base in another random
order for each extra seed and the same experiments give a mean and standard error of the
headline numbers (:func:`seed_spread`) and the verdicts on every seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pandas as pd

from subboost import claims

#: book profile → the zoos compared, as (label, zoo profile); the chapters run on the last
ZOO_SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "smoke": (("zoo v2", "smoke"), ("zoo v3", "smoke-v3")),
    "ci": (("zoo v2", "ci-v2"), ("zoo v3", "ci")),
    "full": (("zoo full", "full"),),  # never built with the v2 recipe: measured alone
}
#: book profile → the expert seeds of the book's zoo when ``expert_seeds`` is None (each extra
#: seed fine-tunes all experts again: about 2–3 minutes for the ci zoo on 2 CPU cores, over
#: the ci book's budget, so one seed there; seconds for the smoke zoo)
EXPERT_SEEDS: dict[str, tuple[int, ...]] = {"smoke": (0, 1), "ci": (0,), "full": (0, 1)}
#: where the appendix tests less than the claim states
SCOPE = {"sb-improves": " (TA only here)", "selection-pool": " (Table 5 protocol, TA+SB merges)"}
#: the claims whose verdicts are recomputed on both zoos
HEADLINE_CLAIMS = ("rank-collapse", "rank-accuracy", "sb-improves", "sb-lines", "beta", "selection-pool")


@dataclass(frozen=True)
class HeadlineSizes:
    """Sizes of the headline experiments of a profile (the same on both zoos).

    rank_counts: N of the stable-rank trend [paper Fig. 2: 4 … 20];
    sb_counts: N of the TA vs TA+SB and the ±LiNeS comparisons [Table 1: 8, 14, 20];
    beta_count: the N of the β ablation [Table 3a: 8]; betas: the β values.
    Selection uses chapter 4's sizes of the same profile."""

    rank_counts: tuple[int, ...]
    sb_counts: tuple[int, ...]
    beta_count: int
    betas: tuple[float, ...] = (0.0, 0.01, 0.02)


SIZES: dict[str, HeadlineSizes] = {
    "smoke": HeadlineSizes(rank_counts=(2, 3), sb_counts=(2, 3), beta_count=3),
    "ci": HeadlineSizes(rank_counts=(4, 8, 14, 20), sb_counts=(8, 14, 20), beta_count=8),
    "full": HeadlineSizes(rank_counts=(4, 8, 14, 20), sb_counts=(8, 14, 20), beta_count=8),
}


def zoo_set(profile: str) -> tuple[tuple[str, str], ...]:
    """The (label, zoo profile) pairs compared for a book profile; ``ValueError`` naming
    ``profile`` for an unknown one."""
    if profile not in ZOO_SETS:
        raise ValueError(f"parameter 'profile': unknown profile {profile!r}; choose one of {', '.join(ZOO_SETS)}")
    return ZOO_SETS[profile]


def seed_zoos(profile: str, seeds: Sequence[int] | None = None) -> list[tuple[str, object]]:
    """(label, zoo config) of the book's zoo with each of ``seeds`` as its experts' seed
    (default :data:`EXPERT_SEEDS`); the seed the book's zoo already has is left out (it is that
    zoo). Each is the same zoo (same base, data and recipe) with experts fine-tuned in another
    random order (``ZooConfig.finetune_seed``)."""
    from dataclasses import replace

    from subboost.zoo.build import get_config

    label, zoo = zoo_set(profile)[-1]
    book_zoo = get_config(zoo)
    seeds = EXPERT_SEEDS[profile] if seeds is None else tuple(int(s) for s in seeds)
    return [(f"{label}, expert seed {s}", replace(book_zoo, profile=f"{book_zoo.profile}-expert-seed{s}", finetune_seed=s))
            for s in seeds if s != book_zoo.expert_seed]


@dataclass
class HeadlineRun:
    """What :func:`headline_run` measured on one zoo: the TA / TA+SB / ±LiNeS table, the β
    table, the stable ranks, the selection run, the calibration measurements and the headline
    verdicts."""

    label: str
    results: pd.DataFrame
    betas: pd.DataFrame
    ranks: pd.DataFrame
    selection: object
    measurements: dict
    verdicts: dict[str, claims.Verdict] = field(default_factory=dict)


def headline_run(suite, profile: str, alpha_grid: Sequence[float], label: str, seed: int = 0,
                 n_random_draws: int | None = None, pi: float = 1e-2, progress: bool = False,
                 lines_b_grid: Sequence[float] | None = None, selection_alpha_grid: Sequence[float] | None = None,
                 cache=None) -> HeadlineRun:
    """Run the headline experiments on one suite and judge them with the claims' rules.

    α is chosen on validation from ``alpha_grid`` for every merge (TA, TA+SB, TA+LiNeS(+SB)
    with LiNeS' b from ``lines_b_grid``, default chapter 3's, each β), and from
    ``selection_alpha_grid`` (default ``alpha_grid``) for each selected or random set of
    experts, then the test splits are evaluated once. ``cache``
    (:class:`subboost.experiments.ResultCache`): merges chapters 1, 3 and 4 evaluated with the
    same settings on the same zoo are read back, not recomputed."""
    from subboost import experiments as ex
    from subboost import hogsvd as hg
    from subboost.chapters import hogsvd_alignment as it
    from subboost.calibration import stable_rank_trend
    from subboost.taskvector import select_block_keys
    from subboost.zoo.report import calibration_measurements, suite_config

    sizes = SIZES[profile]
    grid = tuple(float(a) for a in alpha_grid)
    ta, sb = ex.Variant("TA", "ta", alpha_grid=grid), ex.Variant("TA+SB", "ta", boost_beta=0.0, alpha_grid=grid)
    counts = sorted(set(sizes.sb_counts) | set(sizes.rank_counts))
    results = ex.results_table(suite, counts, [ta, sb], alpha_grid=grid, progress=progress, cache=cache)
    b_grid = tuple(float(b) for b in (ex.LINES_B if lines_b_grid is None else lines_b_grid))
    lines = [ex.Variant("TA+LiNeS", "ta", lines_b_grid=b_grid, alpha_grid=grid),
             ex.Variant("TA+LiNeS+SB", "ta", boost_beta=0.0, lines_b_grid=b_grid, alpha_grid=grid)]
    with_lines = ex.results_table(suite, sorted(sizes.sb_counts), lines, alpha_grid=grid, progress=progress,
                                  cache=cache)
    results = pd.concat([results, with_lines[with_lines.method.isin(["TA+LiNeS", "TA+LiNeS+SB"])]],
                        ignore_index=True)
    beta_variants = [ex.Variant(f"TA+SB β={b}", "ta", boost_beta=b, alpha_grid=grid) for b in sizes.betas]
    betas = ex.results_table(suite, [sizes.beta_count], beta_variants, alpha_grid=grid, progress=progress,
                             cache=cache)
    ranks = ex.rank_collapse_table(suite, sizes.rank_counts, method="ta")

    measurements = calibration_measurements(suite, suite_config(suite), interference=results, progress=progress)

    tasks = list(suite.task_names)
    ch4 = it.chapter_sizes(profile, len(tasks), n_random_draws)
    keys = [k for k in select_block_keys(suite.base_state) if k.startswith("visual.")]
    proto = it.table5_protocol(tasks, ch4, seed=seed)
    align = hg.alignment_matrix(suite.task_vectors(proto.alignment_tasks), keys=keys, pi=pi)
    sel_grid = grid if selection_alpha_grid is None else tuple(float(a) for a in selection_alpha_grid)
    evaluator = it.merge_and_evaluate(suite, ex.Variant("TA+SB", "ta", boost_beta=0.0), sel_grid, cache=cache)
    selection = it.run_selection(proto, align, evaluator, alpha_grid=sel_grid)

    acc = {m: results[(results.method == m) & results.n_tasks.isin(sizes.sb_counts)].set_index("n_tasks").accuracy
           for m in ("TA", "TA+SB", "TA+LiNeS", "TA+LiNeS+SB")}
    ta_norm = results[results.method == "TA"].set_index("n_tasks").normalized_accuracy
    trend = stable_rank_trend(ranks)
    mean_srank = {n: trend[f"mean_stable_rank_{n}"] for n in sizes.rank_counts}
    acc_beta = {b: betas[betas.method == f"TA+SB β={b}"].set_index("n_tasks").accuracy.to_dict()
                for b in sizes.betas}
    verdicts = {
        "rank-collapse": claims.rank_collapse(mean_srank, trend["share_falling"]),
        "rank-accuracy": claims.rank_accuracy([mean_srank[n] for n in sizes.rank_counts],
                                              [float(ta_norm[n]) for n in sizes.rank_counts]),
        "sb-improves": claims.sb_improves_merging({"TA": (acc["TA+SB"] - acc["TA"]).round(1).to_dict()}),
        "sb-lines": claims.sb_lines_complementary(*(acc[m].to_dict() for m in ("TA+LiNeS+SB", "TA+SB", "TA+LiNeS"))),
        "beta": claims.beta_robust(acc_beta),
        "selection-pool": it.compare_to_random(selection, "Pool accuracy").verdict(),
    }
    return HeadlineRun(label, results, betas, ranks, selection, measurements, verdicts)


def verdict_comparison(runs: Sequence[HeadlineRun]) -> pd.DataFrame:
    """One row per headline claim: its statement, each zoo's verdict and measured numbers, and
    whether the verdict is the same on every zoo."""
    rows = []
    for cid in HEADLINE_CLAIMS:
        row = {"claim": claims.CLAIMS[cid].statement + SCOPE.get(cid, "")}
        for run in runs:
            v = run.verdicts[cid]
            row[f"{run.label}: verdict"] = v.verdict
            row[f"{run.label}: ours"] = v.ours
        row["same verdict"] = len({run.verdicts[cid].verdict for run in runs}) == 1
        rows.append(row)
    return pd.DataFrame(rows, index=list(HEADLINE_CLAIMS))


def changes_sentence(table: pd.DataFrame, labels: Sequence[str]) -> str:
    """A sentence naming every verdict that differs between the zoos (computed, for the text)."""
    if len(labels) < 2:
        return f"Only one zoo was measured ({labels[0]}): nothing to compare."
    changed = table[~table["same verdict"]]
    if changed.empty:
        return f"All {len(table)} headline verdicts are the same on both zoos."
    a, b = labels[0], labels[-1]
    parts = [f"{cid} ({row[f'{a}: verdict']} on {a}, {row[f'{b}: verdict']} on {b})"
             for cid, row in changed.iterrows()]
    same = len(table) - len(changed)
    text = f"{len(changed)} of {len(table)} headline verdicts change with the zoo: " + "; ".join(parts) + "."
    return text + (f" The other {same} stay the same." if same else "")


def calibration_columns(runs: Sequence[HeadlineRun]) -> pd.DataFrame:
    """The calibration table with one column per zoo (:func:`subboost.calibration.comparison_table`)."""
    from subboost.calibration import comparison_table

    return comparison_table({run.label: run.measurements for run in runs})


def outside_sentence(table: pd.DataFrame, label: str) -> str:
    """Which measured quantities of zoo ``label`` lie outside their published range."""
    status = table[f"status {label}"]
    ranged = table[status.isin(["inside", "outside"])]
    outside = ranged[ranged[f"status {label}"] == "outside"]
    names = ", ".join(outside.description) if len(outside) else "none"
    return f"{len(outside)} of {len(ranged)} quantities with a published range lie outside it (outside: {names})"


def suites_summary(pair: Mapping[str, object]) -> pd.DataFrame:
    """The two zoos' recipes and experts: mean zero-shot and fine-tuned test accuracy (%)."""
    from subboost.zoo.report import suite_config

    rows = {}
    for label, suite in pair.items():
        cfg = suite_config(suite) or {}
        ref = suite.reference(split="test")
        rows[label] = {"zoo profile": cfg.get("profile"), "learning rate": cfg.get("finetune_lr"),
                       "batch": cfg.get("finetune_batch"), "weight decay": cfg.get("finetune_weight_decay"),
                       "steps": cfg.get("finetune_steps"), "warm-up": cfg.get("finetune_warmup"),
                       "zero-shot (%)": round(100 * float(ref.zeroshot.mean()), 1),
                       "fine-tuned (%)": round(100 * float(ref.finetuned.mean()), 1)}
    return pd.DataFrame(rows)


def alpha_sentence(measured: Mapping[str, Mapping[str, float]], n_tasks: int = 20) -> str:
    """TA's α at ``n_tasks`` and the task vectors' relative size on each zoo, and what their
    joint change says (computed from the measurements, for the text)."""
    from subboost import paper

    key = f"alpha_ta_{n_tasks}"
    have = {label: m for label, m in measured.items() if m.get(key) is not None and m.get("relative_size") is not None}
    if not have:
        return f"TA's α at {n_tasks} tasks was not measured (the suites have fewer tasks)."
    low, high = paper.ALPHA_GRID_TA[0], paper.ALPHA_GRID_TA[-1]
    parts = [f"{m[key]:g} on {label} (relative size ‖Δ‖/‖θ0‖ {100 * m['relative_size']:.1f}%)" for label, m in have.items()]
    text = f"TA's α chosen on validation at {n_tasks} tasks: " + "; ".join(parts) + "."
    alphas = [m[key] for m in have.values()]
    sizes = [m["relative_size"] for m in have.values()]
    if len(have) >= 2 and max(alphas) == min(alphas) and max(sizes) > 1.2 * min(sizes):
        text += (f" The experts' updates shrank by {max(sizes) / min(sizes):.1f}× without moving α: in a near-linear "
                 "regime the optimum would grow as the updates shrink, so what keeps it "
                 + ("below" if alphas[0] < low else "where it is") + " the paper's grid "
                 f"({low:g} … {high:g}) is how strongly this small network's experts interfere when "
                 f"{n_tasks} are summed, not the size of each update.")
    elif all(low <= a <= high for a in alphas):
        text += f" Every zoo's choice lies inside the paper's grid ({low:g} … {high:g})."
    return text


def beta_note(runs: Sequence[HeadlineRun]) -> str:
    """Says on which zoos every β of the ablation gave exactly the same test accuracy (then the
    β verdict holds trivially: the clamp of Alg. 1 chose the same cut-off for every β)."""
    flat = []
    for run in runs:
        acc = run.betas[run.betas.method.str.startswith("TA+SB β=")].accuracy
        if len(acc) > 1 and acc.nunique() == 1:
            flat.append(run.label)
    if not flat:
        return ""
    return (f"On {' and '.join(flat)} every β of the ablation gave exactly the same accuracy: the clamp "
            "of Alg. 1 picked the same cut-off for each, so the β verdict holds trivially there and "
            "says little about β.")


def headline_numbers(run: HeadlineRun) -> dict[str, float]:
    """The headline numbers of one run: test accuracy (%) of every merge of the TA / TA+SB /
    ±LiNeS table, TA+SB's gain over TA, the mean stable rank of TA merges at each N, and the
    selection test's pool accuracy (HO-GSVD and the random draws' mean)."""
    out: dict[str, float] = {}
    merges = run.results[~run.results.method.isin(["Zero-shot", "Fine-tuned"])]
    for (method, n), acc in merges.set_index(["method", "n_tasks"]).accuracy.items():
        out[f"{method} accuracy, N={n}"] = float(acc)
    ta = merges[merges.method == "TA"].set_index("n_tasks").accuracy
    sb = merges[merges.method == "TA+SB"].set_index("n_tasks").accuracy
    for n in sorted(set(ta.index) & set(sb.index)):
        out[f"TA+SB − TA, N={n}"] = float(sb[n] - ta[n])
    for n, rank in run.ranks.groupby("n_tasks").stable_rank.mean().items():
        out[f"TA mean stable rank, N={n}"] = float(rank)
    rows = run.selection.rows
    out["HO-GSVD selection, pool accuracy"] = float(rows[rows.kind == "HO-GSVD"]["Pool accuracy"].iloc[0])
    out["random draws, pool accuracy (mean)"] = float(rows[rows.kind == "Random"]["Pool accuracy"].mean())
    return out


def seed_spread(runs: Sequence[HeadlineRun]) -> pd.DataFrame:
    """Mean, standard error (sample std / √k) and range over the runs (one per expert seed of the
    same zoo) of each :func:`headline_numbers` entry; empty with fewer than two runs."""
    if len(runs) < 2:
        return pd.DataFrame(columns=["mean", "standard error", "min", "max", "seeds"])
    table = pd.DataFrame({run.label: headline_numbers(run) for run in runs})
    k = table.shape[1]
    return pd.DataFrame({"mean": table.mean(axis=1), "standard error": table.std(axis=1, ddof=1) / k ** 0.5,
                         "min": table.min(axis=1), "max": table.max(axis=1), "seeds": k})


def seed_sentence(runs: Sequence[HeadlineRun], changed_with_zoo: Sequence[str] = ()) -> str:
    """Which headline verdicts differ between expert seeds of the same zoo (computed, for the
    text). ``changed_with_zoo``: the claims whose verdict differs between the zoos; with one
    seed the sentence says that their change was not compared with the seeds' spread."""
    if len(runs) < 2:
        text = ("One expert seed was run (parameter `expert_seeds` adds more; each fine-tunes all 20 experts "
                "again and reruns these experiments), so these numbers have no standard error here.")
        if changed_with_zoo:
            text += (f" Whether the verdicts that change with the zoo ({', '.join(changed_with_zoo)}) change by more "
                     "than another expert seed of the same zoo would move them is therefore not measured in this "
                     "run; a verdict decided by a few tenths of a point may not be.")
        return text
    differ = [cid for cid in HEADLINE_CLAIMS if len({run.verdicts[cid].verdict for run in runs}) > 1]
    text = f"Over {len(runs)} expert seeds of the book's zoo, "
    if not differ:
        return text + f"all {len(HEADLINE_CLAIMS)} headline verdicts are the same on every seed."
    parts = ["{} ({})".format(cid, ", ".join(f"{run.verdicts[cid].verdict} on {run.label}" for run in runs))
             for cid in differ]
    return text + f"{len(differ)} of {len(HEADLINE_CLAIMS)} headline verdicts depend on the seed: " + "; ".join(parts) + "."


def ta_normalised_sentence(measured: Mapping[str, Mapping[str, float]], profile: str = "ci") -> str:
    """TA's normalised accuracy at the Table 1 counts on each zoo beside the paper's (the ratio of
    Table 1's means), how far apart they are and whether each falls with N as the paper's does
    (computed from the measurements, for the text). The last entry of ``measured`` is the
    book's zoo; ``profile`` ``full`` (a larger model) drops the note on the model size."""
    from subboost import paper
    from subboost.calibration import table1_normalised

    counts = list(paper.TASK_COUNTS)
    ours = {label: [m.get(f"ta_normalised_{n}") for n in counts] for label, m in measured.items()}
    ours = {label: v for label, v in ours.items() if all(x is not None for x in v)}
    if not ours:
        return "TA's normalised accuracy at the paper's task counts was not measured (the suites have fewer tasks)."
    theirs = list(table1_normalised("TA"))
    fmt = "/".join
    parts = [f"{fmt(f'{x:.1f}' for x in v)} on {label}" for label, v in ours.items()]
    text = (f"TA's normalised accuracy (merged / fine-tuned, %) at {fmt(map(str, counts))} tasks: " + "; ".join(parts)
            + f"; the paper's {fmt(f'{x:.1f}' for x in theirs)} (Table 1, ratio of its means).")
    for label, v in ours.items():
        gaps = [t - o for o, t in zip(v, theirs)]
        where = ("below the paper's at every count" if min(gaps) > 0 else
                 "above the paper's at every count" if max(gaps) < 0 else "on both sides of the paper's")
        trend = v[-1] - v[0]
        text += (f" {label.capitalize()} is {min(abs(g) for g in gaps):.1f}–{max(abs(g) for g in gaps):.1f} points "
                 f"{where}, and changes by {trend:+.1f} points from {counts[0]} to {counts[-1]} tasks "
                 f"(the paper's: {theirs[-1] - theirs[0]:+.1f}).")
    if len(ours) >= 2:
        moved = max(abs(a - b) for a, b in zip(*list(ours.values())[:2]))
        text += f" The recipe change moved it by at most {moved:.1f} points."
    book_zoo = list(ours.values())[-1]
    gaps = [t - o for o, t in zip(book_zoo, theirs)]
    level = ("keep less of their experts' accuracy than" if min(gaps) > 0 else
             "keep more of their experts' accuracy than" if max(gaps) < 0 else "keep about as much as")
    zoo_trend, paper_trend = book_zoo[-1] - book_zoo[0], theirs[-1] - theirs[0]
    trend = ("and, unlike them, do not lose more as N grows" if zoo_trend >= 0 > paper_trend else
             "and lose less than them as N grows" if paper_trend < zoo_trend < 0 else "and lose as much or more as N grows")
    text += (f" The paper gives one value per count, not a range, so these rows are context, not targets: the "
             f"book's zoo's TA merges {level} the paper's ViT-B/32 merges {trend}.")
    if profile != "full":
        text += (" The expert recipes measured for v3 (benchmarks/README.md, \"Zoo recipe search\") did not close "
                 "this; a wider or deeper model was not tried (the ci book's time budget).")
    return text
