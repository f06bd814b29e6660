"""Calibration of a suite's task vectors against what is published for real CLIP ViT experts.

Is the mini zoo in the regime of real fine-tuned CLIP task vectors? This module holds the
quantities that shape the paper's results, measured the same way on any suite, and the
published values they are compared with (quoted in :mod:`subboost.paper`, each with its
source):

- pairwise cosine similarity between the flattened task vectors of different tasks
  (Ilharco et al. 2023: close to orthogonal);
- how low-rank each per-layer task matrix is: the share of ‖ΔW‖F² in its top singular
  directions at 10% storage, the share of the rank that holds 99% of ‖ΔW‖F², and the accuracy an
  expert keeps when every block matrix of its task vector is truncated to 10% of its size
  (Gargiulo et al. 2025, TSV-Compress: about 99%);
- the relative size ‖Δ‖/‖θ0‖ (no published value found; the fine-tuning recipe that sets it is
  published and listed beside it);
- the TA merging coefficient α chosen on validation (the paper's grid is 0.1 … 1.0);
- zero-shot, fine-tuned and TA accuracy at 8 / 14 / 20 tasks (paper Table 1);
- the stable rank of the TA merge as N grows (paper Fig. 2, 7: it falls for most sublayers).

The functions here are pure (tensors and tables in, numbers out); the zoo report
(:mod:`subboost.zoo.report`) runs them on a suite. Published values live in
:mod:`subboost.paper` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from subboost import paper
from subboost.spectral import energy_rank_from_spectrum, singular_values
from subboost.taskvector import LAYER_TYPES, StateDict, is_zero, select_block_keys

#: TSV-Compress keeps each task matrix at this fraction of its size (Gargiulo et al. 2025)
STORAGE_FRACTION = paper.TSV_COMPRESS["storage_fraction"]
#: the energy share whose rank fraction is reported
ENERGY_FRACTION = 0.99


# ----------------------------------------------------------------------------- pure measures


def _flat(vector: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    return torch.cat([vector[k].detach().reshape(-1).to("cpu", torch.float64) for k in keys])


def changed_keys(vectors: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Floating-point keys that at least one task vector changes (the trained parameters)."""
    first = next(iter(vectors.values()))
    return [k for k, v in first.items()
            if v.is_floating_point() and any(not is_zero(vec[k]) for vec in vectors.values())]


def pairwise_cosine(vectors: Mapping[str, Mapping[str, Tensor]], keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Cosine similarity ⟨Δi, Δj⟩ / (‖Δi‖‖Δj‖) between the flattened task vectors (float64),
    as a square table indexed by task. ``keys`` default: every parameter some task changes.
    A zero task vector has cosine 0 with every other (and 1 with itself)."""
    names = list(vectors)
    if len(names) < 2:
        raise ValueError("pairwise_cosine needs at least two task vectors")
    keys = changed_keys(vectors) if keys is None else list(keys)
    flat = torch.stack([_flat(vectors[n], keys) for n in names])
    norms = flat.norm(dim=1)
    gram = flat @ flat.T
    denom = torch.outer(norms, norms)
    sim = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(gram))
    sim.fill_diagonal_(1.0)
    return pd.DataFrame(sim.numpy(), index=names, columns=names)


def off_diagonal(sim: pd.DataFrame) -> pd.Series:
    """The entries of a square similarity table above its diagonal (one per pair)."""
    n = sim.shape[0]
    values = [float(sim.iat[i, j]) for i in range(n) for j in range(i + 1, n)]
    return pd.Series(values, dtype=float)


def energy_retained(s: Tensor, k: int) -> float:
    """Σ_{i<k} σi² / Σ σi² of a descending spectrum: the share of ‖A‖F² in the top-k directions
    (1.0 for an all-zero spectrum, which loses nothing)."""
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    sq = s.to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1.0
    return float(sq[:k].sum()) / total


def rank_fraction_for_energy(s: Tensor, fraction: float = ENERGY_FRACTION) -> float:
    """The smallest number of leading directions holding ``fraction`` of Σσ², divided by the
    number of singular values (the full rank of the matrix's shape)."""
    if s.numel() == 0:
        raise ValueError("empty spectrum")
    return energy_rank_from_spectrum(s, fraction) / s.numel()


def storage_rank(shape: Sequence[int], storage_fraction: float = STORAGE_FRACTION) -> int:
    """Rank k at which the top-k SVD factors of an m×n matrix take ``storage_fraction`` of its
    entries: k(m + n) ≤ f·m·n, at least 1 and at most min(m, n). (TSV-Compress quotes its
    compression as a share of the matrix's size.)"""
    m, n = int(shape[0]), int(shape[1])
    if not 0.0 < storage_fraction <= 1.0:
        raise ValueError(f"storage_fraction must lie in (0, 1], got {storage_fraction}")
    return max(1, min(min(m, n), math.floor(storage_fraction * m * n / (m + n))))


def truncate_matrix(matrix: Tensor, k: int) -> Tensor:
    """Best rank-k approximation (top-k singular triplets, computed in float64), in the input's dtype."""
    u, s, vh = torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)
    k = max(0, min(int(k), s.numel()))
    return ((u[:, :k] * s[:k]) @ vh[:k]).to(matrix.dtype)


def truncate_task_vector(delta: Mapping[str, Tensor], storage_fraction: float = STORAGE_FRACTION,
                         layer_types: Iterable[str] = LAYER_TYPES) -> StateDict:
    """The task vector with every non-zero block matrix truncated to :func:`storage_rank`
    (TSV-Compress for one task); every other parameter is kept whole, as TSV keeps non-matrix
    parameters."""
    out = dict(delta)
    for key in select_block_keys(delta, layer_types):
        m = delta[key]
        if not is_zero(m):
            out[key] = truncate_matrix(m, storage_rank(m.shape, storage_fraction))
    return out


def relative_size(base: Mapping[str, Tensor], delta: Mapping[str, Tensor], keys: Sequence[str] | None = None) -> float:
    """‖Δ‖ / ‖θ0‖ over ``keys`` (default: the keys where Δ is not zero, i.e. the trained
    parameters), both flattened, in float64."""
    keys = [k for k, v in delta.items() if v.is_floating_point() and not is_zero(v)] if keys is None else list(keys)
    if not keys:
        return 0.0
    num = float(_flat(delta, keys).norm())
    den = float(_flat(base, keys).norm())
    if den == 0.0:
        raise ValueError("relative_size: the base weights are zero on the selected keys")
    return num / den


def block_table(base: Mapping[str, Tensor], vectors: Mapping[str, Mapping[str, Tensor]],
                storage_fraction: float = STORAGE_FRACTION, energy: float = ENERGY_FRACTION) -> pd.DataFrame:
    """One row per (task, non-zero block matrix): shape, the storage rank k, the share of ‖ΔW‖F²
    in the top-k directions, the rank fraction holding ``energy`` of it, and ‖ΔW‖F/‖W0‖F."""
    rows = []
    for task, delta in vectors.items():
        for key in select_block_keys(delta):
            m = delta[key]
            if is_zero(m):
                continue
            s = singular_values(m)
            k = storage_rank(m.shape, storage_fraction)
            w0 = float(base[key].detach().to(torch.float64).norm())
            rows.append(dict(task=task, key=key, rows=m.shape[0], cols=m.shape[1], k=k,
                             energy_at_k=energy_retained(s, k),
                             rank_fraction_energy=rank_fraction_for_energy(s, energy),
                             relative_size=float(s.square().sum().sqrt()) / w0 if w0 > 0 else float("nan")))
    return pd.DataFrame(rows, columns=["task", "key", "rows", "cols", "k", "energy_at_k",
                                       "rank_fraction_energy", "relative_size"])


def stable_rank_trend(ranks: pd.DataFrame) -> dict[str, float]:
    """From a :func:`subboost.experiments.rank_collapse_table` (columns n_tasks, key,
    stable_rank): the mean stable rank at each N (``mean_stable_rank_N``) and the share of
    matrices whose stable rank is lower at the largest N than at the smallest
    (``share_falling``)."""
    counts = sorted(ranks.n_tasks.unique())
    if len(counts) < 2:
        raise ValueError("stable_rank_trend needs at least two task counts")
    out = {f"mean_stable_rank_{n}": float(ranks[ranks.n_tasks == n].stable_rank.mean()) for n in counts}
    wide = ranks.pivot(index="key", columns="n_tasks", values="stable_rank")
    out["share_falling"] = float((wide[counts[-1]] < wide[counts[0]]).mean())
    return out


# ------------------------------------------------------------------------- published values


@dataclass(frozen=True)
class Published:
    """One published value: a quantity's key, what it is, the value as published (text), the
    range it implies (``low``/``high``, None when the publication gives no number) and the source."""

    quantity: str
    description: str
    published: str
    low: float | None
    high: float | None
    source: str


def table1_normalised(method: str = "TA") -> tuple[float, ...]:
    """A Table 1 method's accuracy divided by the fine-tuned accuracy, in percent, at 8 / 14 / 20
    tasks (derived from the paper's means: the ratio of means, not the paper's own metric)."""
    ft = paper.TABLE1_VIT_B32["Fine-tuned"]
    return tuple(100 * a / f for a, f in zip(paper.TABLE1_VIT_B32[method], ft))


def published_values() -> list[Published]:
    """The calibration targets, from :mod:`subboost.paper` (no number is typed here)."""
    t1 = paper.TABLE1_VIT_B32
    rec, tall = paper.FINETUNE_RECIPE_ILHARCO2023, paper.FINETUNE_RECIPE_TALL_MASKS
    grid = paper.ALPHA_GRID_TA
    rows = [
        Published("cosine_mean", "mean cosine similarity between task vectors (pairs of tasks)",
                  "close to 0 (near-orthogonal; plotted only)", None, None, paper.ILHARCO2023_COSINE_SOURCE),
        Published("cosine_max", "largest cosine similarity between two task vectors",
                  "close to 0 (plotted only)", None, None, paper.ILHARCO2023_COSINE_SOURCE),
        Published("lowrank_accuracy_retained",
                  f"accuracy kept with each task matrix at {paper.TSV_COMPRESS['storage_fraction']:.0%} of its size",
                  f"≈ {paper.TSV_COMPRESS['accuracy_retained']:.0%}", paper.TSV_COMPRESS["accuracy_retained"] - 0.01,
                  None, paper.TSV2025_SOURCE),
        Published("lowrank_energy_at_10pct", "share of ‖ΔW‖F² in the top directions at 10% storage",
                  "not published (the accuracy above is)", None, None, paper.TSV2025_SOURCE),
        Published("rank_fraction_99", "share of the rank holding 99% of ‖ΔW‖F²", "not published", None, None,
                  paper.TSV2025_SOURCE),
        Published("relative_size", "‖Δ‖ / ‖θ0‖ over the trained parameters", "not found in the sources read",
                  None, None, "—"),
        Published("relative_size_block_median", "median ‖ΔW‖F / ‖W0‖F over block matrices",
                  "not found in the sources read", None, None, "—"),
        Published("finetune_lr", "expert learning rate (AdamW)", f"{rec['learning_rate']:g}", None, None,
                  f"{paper.ILHARCO2023_SOURCE}; {paper.TALL_MASKS_SOURCE}"),
        Published("finetune_steps", "expert optimisation steps",
                  f"{rec['steps']} (Ilharco); per-dataset epochs at batch {tall['batch_size']} (TALL masks)",
                  None, None, f"{paper.ILHARCO2023_SOURCE}; {paper.TALL_MASKS_SOURCE}"),
        Published("finetune_batch", "expert batch size", f"{rec['batch_size']}", None, None, paper.ILHARCO2023_SOURCE),
        Published("finetune_weight_decay", "expert weight decay (AdamW)", f"{rec['weight_decay']:g}",
                  None, None, f"{paper.ILHARCO2023_SOURCE}; {paper.TALL_MASKS_SOURCE}"),
        Published("finetune_warmup_share", "warm-up steps / total steps", f"{rec['warmup_steps']}/{rec['steps']}",
                  None, None, paper.ILHARCO2023_SOURCE),
    ]
    for n in (8, 20):
        rows.append(Published(f"alpha_ta_{n}", f"TA α chosen on validation, {n} tasks",
                              f"in the grid {grid[0]:g} … {grid[-1]:g} (choice not reported)", grid[0], grid[-1],
                              paper.ALPHA_GRID_SOURCE))
    for i, n in enumerate(paper.TASK_COUNTS):
        rows.append(Published(f"zeroshot_{n}", f"zero-shot accuracy (%), {n} tasks", f"{t1['Zero-shot'][i]:g}",
                              None, None, paper.TABLE1_SOURCE))
        rows.append(Published(f"finetuned_{n}", f"fine-tuned accuracy (%), {n} tasks", f"{t1['Fine-tuned'][i]:g}",
                              None, None, paper.TABLE1_SOURCE))
        rows.append(Published(f"gap_{n}", f"fine-tuned − zero-shot (points), {n} tasks",
                              f"{t1['Fine-tuned'][i] - t1['Zero-shot'][i]:.1f}", None, None, paper.TABLE1_SOURCE))
        rows.append(Published(f"ta_normalised_{n}", f"TA accuracy / fine-tuned (%), {n} tasks",
                              f"{table1_normalised('TA')[i]:.1f} (TA {t1['TA'][i]:g} / FT {t1['Fine-tuned'][i]:g})",
                              None, None, paper.TABLE1_SOURCE + ", ratio of its means"))
    counts = paper.STABLE_RANK_TASK_COUNTS
    rows.append(Published("stable_rank_share_falling",
                          f"share of block matrices whose TA stable rank falls from N = {counts[0]} to {counts[-1]}",
                          "a large majority (> 0.5)", 0.5, 1.0, paper.STABLE_RANK_TREND_SOURCE))
    for n in counts:
        rows.append(Published(f"mean_stable_rank_{n}", f"mean stable rank of the TA merge, N = {n}",
                              "decreasing with N (plotted only)", None, None, paper.STABLE_RANK_TREND_SOURCE))
    return rows


def calibration_table(measured: Mapping[str, float | str], column: str = "zoo") -> pd.DataFrame:
    """The published values beside measured ones: columns quantity, description, published,
    source, ``column`` (the measurement) and status: ``inside`` / ``outside`` the published range,
    ``no range`` where the publication gives none, ``not measured`` where ``measured`` lacks it."""
    rows = []
    for p in published_values():
        value = measured.get(p.quantity)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            status = "not measured"
        elif p.low is None and p.high is None or isinstance(value, str):
            status = "no range"
        else:
            inside = (p.low is None or float(value) >= p.low) and (p.high is None or float(value) <= p.high)
            status = "inside" if inside else "outside"
        rows.append(dict(quantity=p.quantity, description=p.description, published=p.published,
                         source=p.source, **{column: value}, status=status))
    return pd.DataFrame(rows)


def recipe_measurements(config: Mapping) -> dict[str, float | str]:
    """The zoo's expert recipe in the calibration's quantities (from a ZooConfig's JSON)."""
    steps = int(config["finetune_steps"])
    return {"finetune_lr": float(config["finetune_lr"]), "finetune_steps": float(steps),
            "finetune_batch": float(config["finetune_batch"]),
            "finetune_weight_decay": float(config["finetune_weight_decay"]),
            "finetune_warmup_share": float(config["finetune_warmup"]) / steps}


def lowrank_summary(blocks: pd.DataFrame) -> dict[str, float]:
    """Means over a :func:`block_table` (all tasks and matrices), and the median relative size."""
    return {"lowrank_energy_at_10pct": float(blocks.energy_at_k.mean()),
            "rank_fraction_99": float(blocks.rank_fraction_energy.mean()),
            "relative_size_block_median": float(blocks.relative_size.median())}


def comparison_table(measured: Mapping[str, Mapping[str, float | str]]) -> pd.DataFrame:
    """Several suites' measurements beside the published values: one column per suite (the
    keys of ``measured``, e.g. ``{"zoo v2": ..., "zoo v3": ...}``) and one status column per
    suite, ``status <label>`` (as :func:`calibration_table`)."""
    if not measured:
        raise ValueError("comparison_table needs at least one suite's measurements")
    out = None
    for label, values in measured.items():
        table = calibration_table(values, column=label).rename(columns={"status": f"status {label}"})
        out = table if out is None else out.merge(table[["quantity", label, f"status {label}"]], on="quantity")
    labels = list(measured)
    return out[["quantity", "description", "published", "source", *labels, *(f"status {x}" for x in labels)]]
