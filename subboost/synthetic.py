"""Synthetic task vectors with known parts, and the numerical checks of the paper's
Propositions 1-4 (Sec. 3.1, Supp. E) and of the N^γ normalisation test (Supp. E.4).

The model mirrors Supp. E (Eq. 8-10): task vector i of one weight matrix is

    Δi = Ci + Ui + ℰi,

- Ci, the *common* part: every Ci lies in one fixed rank-r subspace {Uc X Vcᵀ} and is a
  shared core S0 plus a small task-private perturbation inside that subspace, so the Ci have
  positive pairwise cosine similarity and bounded energy, as Prop. 3 assumes;
- Ui, the *unique* (task-specific) part, and ℰi, the *noise* (entries ~ N(0, σ²) before
  orthogonalisation). All Ui and ℰi are made exactly pairwise Frobenius-orthogonal (also to
  every matrix of the common subspace) by one QR factorisation of their flattened versions,
  so Ei = Ui + ℰi satisfy Eq. 9, ⟨Ei, Ej⟩F = 0 for i ≠ j, up to float64 rounding.

Merging the first N task vectors with coefficient α gives
Δm = α Σ Δi = Δcommon + Δunique with Δcommon = α Σ Ci, Δunique = α Σ Ei
(α = 1/N is the averaging of Supp. E.1, Eq. 10). Task counts are nested prefixes of one draw,
as in the paper (the first 4 / 8 / 14 / 20 tasks).

Where this differs from the paper: the paper's noise is only approximately orthogonal
("due to its random nature"); ours is exactly orthogonal. Unique parts of a chosen rank are
orthogonalised after drawing, which adds small full-rank corrections of relative size about
√(K/(mn)) for K = r² + 2N orthogonalised directions.

Every function is pure (explicit seeds, no module state) and returns tensors or tidy
:class:`pandas.DataFrame` tables for plotting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from subboost.boost import boost_cutoff_index, subspace_boost
from subboost.spectral import stable_rank  # Eq. 2, in float64 on the CPU wherever the matrix lives

DTYPE = torch.float64

# ----------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and energies of the synthetic task vectors of one weight matrix.

    Attributes:
        rows, cols: matrix shape (m, n).
        common_rank: r, the rank of the common subspace (bounded, as Prop. 3 requires).
        common_norm: μ, the Frobenius norm of the shared core S0 (so ‖Ci‖F ≈ μ·√(1+jitter²)).
        common_decay: ratio between consecutive singular values of S0 (1 = flat).
        common_jitter: Frobenius norm of each task's private perturbation of the core,
            relative to μ. Below √2 − 1 every pairwise cosine similarity of the Ci is > 0.
        unique_norm: the largest ‖Ui‖F (the B of Prop. 1 when there is no noise).
        unique_norm_spread: ‖Ui‖F is drawn uniformly in [(1 − spread)·B, B].
        unique_rank: rank of each Ui before orthogonalisation; ``None`` draws dense Gaussian
            ("noise-like") unique parts.
        noise_std: σ, the entry-wise standard deviation of ℰi (0 disables the noise).
    """

    rows: int = 128
    cols: int = 128
    common_rank: int = 4
    common_norm: float = 1.0
    common_decay: float = 0.7
    common_jitter: float = 0.2
    unique_norm: float = 1.0
    unique_norm_spread: float = 0.0
    unique_rank: int | None = None
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"shape must be positive, got {self.rows}×{self.cols}")
        if not 1 <= self.common_rank <= min(self.rows, self.cols):
            raise ValueError(f"common_rank must lie in [1, {min(self.rows, self.cols)}], got {self.common_rank}")
        if self.common_norm <= 0 or self.unique_norm < 0 or self.noise_std < 0:
            raise ValueError("common_norm must be > 0, unique_norm and noise_std ≥ 0")
        if not 0 < self.common_decay <= 1:
            raise ValueError(f"common_decay must lie in (0, 1], got {self.common_decay}")
        if not 0 <= self.common_jitter < math.sqrt(2) - 1:
            raise ValueError(f"common_jitter must lie in [0, √2 − 1) to keep the common parts "
                             f"positively correlated, got {self.common_jitter}")
        if not 0 <= self.unique_norm_spread <= 1:
            raise ValueError(f"unique_norm_spread must lie in [0, 1], got {self.unique_norm_spread}")
        if self.unique_rank is not None and not 1 <= self.unique_rank <= min(self.rows, self.cols):
            raise ValueError(f"unique_rank must be None or in [1, {min(self.rows, self.cols)}], got {self.unique_rank}")


class MergedParts(NamedTuple):
    """Δm = α Σ Δi and its two parts Δcommon = α Σ Ci, Δunique = α Σ (Ui + ℰi) (Eq. 8, 10)."""

    merged: Tensor
    common: Tensor
    unique: Tensor


@dataclass(frozen=True)
class SyntheticTaskVectors:
    """N synthetic task vectors of one matrix, stored by part, each of shape (N, m, n)."""

    common: Tensor
    unique: Tensor
    noise: Tensor
    spec: SyntheticSpec = field(default_factory=SyntheticSpec)

    @property
    def n_tasks(self) -> int:
        return int(self.common.shape[0])

    def task_vectors(self, n: int | None = None) -> Tensor:
        """Δi = Ci + Ui + ℰi for the first ``n`` tasks (all by default)."""
        n = self._check_n(n)
        return self.common[:n] + self.unique[:n] + self.noise[:n]

    def task_specific(self, n: int | None = None) -> Tensor:
        """Ei = Ui + ℰi, the task-specific components of Prop. 1."""
        n = self._check_n(n)
        return self.unique[:n] + self.noise[:n]

    def bound(self, n: int | None = None) -> float:
        """B = max_i ‖Ei‖F over the first ``n`` tasks (Prop. 1: "B can be set to the maximum")."""
        e = self.task_specific(n)
        return float(torch.linalg.matrix_norm(e, "fro").max())

    def merge(self, n: int | None = None, alpha: float | None = None) -> MergedParts:
        """Task Arithmetic of the first ``n`` tasks: Δm = α Σ Δi; ``alpha=None`` averages
        (α = 1/n, Supp. E.1)."""
        n = self._check_n(n)
        a = 1.0 / n if alpha is None else float(alpha)
        common = a * self.common[:n].sum(0)
        unique = a * (self.unique[:n] + self.noise[:n]).sum(0)
        return MergedParts(common + unique, common, unique)

    def _check_n(self, n: int | None) -> int:
        if n is None:
            return self.n_tasks
        if not 1 <= int(n) <= self.n_tasks:
            raise ValueError(f"n must lie in [1, {self.n_tasks}], got {n}")
        return int(n)


def _orthonormal(rows: int, cols: int, gen: torch.Generator, device: torch.device) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=DTYPE, device="cpu"))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(device)


def make_task_vectors(
    spec: SyntheticSpec,
    n_tasks: int,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> SyntheticTaskVectors:
    """Draw ``n_tasks`` synthetic task vectors (Supp. E model, see the module docstring).

    Guarantees (checked by ``tests/test_synthetic.py``):

    - all Ui and ℰi are pairwise Frobenius-orthogonal (Eq. 9) and orthogonal to every matrix
      Uc X Vcᵀ of the common subspace, to float64 rounding;
    - ‖Ui‖F ≤ ``spec.unique_norm`` (equality when ``unique_norm_spread`` is 0);
    - every Ci has rank ≤ ``spec.common_rank``.

    Random numbers come from a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives
    the same draw on every device.
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be ≥ 1, got {n_tasks}")
    device = torch.device(device)
    m, n, r = spec.rows, spec.cols, spec.common_rank
    n_flat_needed = r * r + 2 * n_tasks
    if n_flat_needed > m * n:
        raise ValueError(f"{n_tasks} tasks need {n_flat_needed} orthogonal directions, "
                         f"more than the {m * n} entries of a {m}×{n} matrix")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    # Common subspace and shared core S0 (diagonal, geometric decay, ‖S0‖F = μ).
    uc = _orthonormal(m, r, gen, device)
    vc = _orthonormal(n, r, gen, device)
    core_sv = torch.tensor([spec.common_decay**j for j in range(r)], dtype=DTYPE)
    core_sv = core_sv * (spec.common_norm / torch.linalg.vector_norm(core_sv))
    jitter = torch.randn(n_tasks, r, r, generator=gen, dtype=DTYPE)
    jitter = jitter / torch.linalg.matrix_norm(jitter, "fro").clamp_min(1e-300)[:, None, None]
    cores = torch.diag(core_sv).unsqueeze(0) + spec.common_jitter * spec.common_norm * jitter
    common = uc.unsqueeze(0) @ cores.to(device) @ vc.T.unsqueeze(0)

    # Raw unique parts and noise, then one QR of their flattened versions, preceded by the
    # r² orthonormal matrices u_a v_bᵀ spanning the common subspace.
    if spec.unique_rank is None:
        raw_unique = torch.randn(n_tasks, m, n, generator=gen, dtype=DTYPE)
    else:
        k = spec.unique_rank
        raw_unique = torch.randn(n_tasks, m, k, generator=gen, dtype=DTYPE) @ torch.randn(
            n_tasks, k, n, generator=gen, dtype=DTYPE)
    raw_noise = torch.randn(n_tasks, m, n, generator=gen, dtype=DTYPE) * spec.noise_std
    norm_draw = torch.rand(n_tasks, generator=gen, dtype=DTYPE)
    raw_unique, raw_noise = raw_unique.to(device), raw_noise.to(device)

    common_basis = torch.einsum("ia,jb->abij", uc, vc).reshape(r * r, m * n)
    stacked = torch.cat([common_basis, raw_unique.reshape(n_tasks, -1)], 0)
    if spec.noise_std > 0:
        stacked = torch.cat([stacked, raw_noise.reshape(n_tasks, -1)], 0)
    q, rr = torch.linalg.qr(stacked.T)  # columns orthonormal, (m·n, k)
    q = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)  # keep each direction along its raw draw
    unique_dirs = q[:, r * r: r * r + n_tasks].T.reshape(n_tasks, m, n)
    norms = spec.unique_norm * (1.0 - spec.unique_norm_spread * norm_draw).to(device)
    unique = unique_dirs * norms[:, None, None]
    if spec.noise_std > 0:
        noise_dirs = q[:, r * r + n_tasks:].T.reshape(n_tasks, m, n)
        noise = noise_dirs * torch.linalg.matrix_norm(raw_noise, "fro")[:, None, None]
    else:
        noise = torch.zeros_like(unique)
    return SyntheticTaskVectors(common=common, unique=unique, noise=noise, spec=spec)


# ----------------------------------------------------------------------------- helpers


def spectral_norm(matrix: Tensor) -> float:
    """‖A‖2, the largest singular value."""
    return float(torch.linalg.matrix_norm(matrix, 2))


def frobenius_norm(matrix: Tensor) -> float:
    """‖A‖F."""
    return float(torch.linalg.matrix_norm(matrix, "fro"))


def gram_matrix(mats: Tensor) -> Tensor:
    """Frobenius inner products ⟨Ai, Aj⟩F of a stack (N, m, n), as an (N, N) matrix."""
    flat = mats.reshape(mats.shape[0], -1)
    return flat @ flat.T


def max_offdiagonal_cosine(mats: Tensor) -> float:
    """max_{i≠j} |⟨Ai, Aj⟩F| / (‖Ai‖F ‖Aj‖F): 0 for exactly pairwise orthogonal matrices."""
    g = gram_matrix(mats)
    d = torch.sqrt(torch.diagonal(g)).clamp_min(1e-300)
    c = (g / d[:, None] / d[None, :]).abs()
    c.fill_diagonal_(0.0)
    return float(c.max()) if c.numel() > 1 else 0.0


def mean_cosine_similarity(mats: Tensor) -> float:
    """ρ̄: the mean cosine similarity over all N² ordered pairs (diagonal included), as in the
    proof of Prop. 3 (Eq. 25)."""
    g = gram_matrix(mats)
    d = torch.sqrt(torch.diagonal(g)).clamp_min(1e-300)
    return float((g / d[:, None] / d[None, :]).mean())


@dataclass(frozen=True)
class LogLogFit:
    """Least-squares line log y = slope·log x + log(prefactor)."""

    slope: float
    prefactor: float
    slope_stderr: float

    def __call__(self, x: np.ndarray | Sequence[float]) -> np.ndarray:
        return self.prefactor * np.asarray(x, dtype=float) ** self.slope


def fit_loglog(x: Iterable[float], y: Iterable[float]) -> LogLogFit:
    """Fit y ≈ c·x^slope by least squares on (log x, log y); needs ≥ 2 distinct x, all > 0."""
    lx, ly = np.log(np.asarray(list(x), float)), np.log(np.asarray(list(y), float))
    if lx.size < 2 or np.ptp(lx) == 0:
        raise ValueError("a log-log fit needs at least two distinct x values")
    a = np.vstack([lx, np.ones_like(lx)]).T
    coef, res, *_ = np.linalg.lstsq(a, ly, rcond=None)
    dof = lx.size - 2
    if dof > 0:
        resid = ly - a @ coef
        s2 = float(resid @ resid) / dof
        stderr = math.sqrt(s2 / float(((lx - lx.mean()) ** 2).sum()))
    else:
        stderr = float("nan")
    return LogLogFit(float(coef[0]), float(math.exp(coef[1])), stderr)


def _check_counts(task_counts: Sequence[int], n_available: int) -> list[int]:
    counts = sorted({int(c) for c in task_counts})
    if not counts:
        raise ValueError("task_counts must not be empty")
    if counts[0] < 1 or counts[-1] > n_available:
        raise ValueError(f"task_counts must lie in [1, {n_available}], got {counts}")
    return counts


# ----------------------------------------------------------------------------- Prop. 1-3


def prop1_table(tv: SyntheticTaskVectors, task_counts: Sequence[int]) -> pd.DataFrame:
    """Prop. 1 (Eq. 11-15) for averaging (α = 1/N): per N, ‖Δunique‖2, ‖Δunique‖F, the bound
    B/√N with B = max_{i≤N} ‖Ei‖F, and ‖Δcommon‖2 (which stays O(1))."""
    rows = []
    for n in _check_counts(task_counts, tv.n_tasks):
        parts = tv.merge(n)
        b = tv.bound(n)
        rows.append(dict(
            N=n, unique_spectral=spectral_norm(parts.unique), unique_frobenius=frobenius_norm(parts.unique),
            B=b, bound=b / math.sqrt(n), common_spectral=spectral_norm(parts.common),
        ))
    return pd.DataFrame(rows)


def prop2_table(
    tv: SyntheticTaskVectors, task_counts: Sequence[int], betas: Sequence[float] = ()
) -> pd.DataFrame:
    """Prop. 2 (Eq. 16-21): per N, the stable ranks of Δm and of Δcommon and their gap, and
    (beyond the paper's statement) the stable rank of SB(Δm) for each β in ``betas``."""
    rows = []
    for n in _check_counts(task_counts, tv.n_tasks):
        parts = tv.merge(n)
        row = dict(N=n, srank_merged=stable_rank(parts.merged), srank_common=stable_rank(parts.common),
                   unique_frobenius=frobenius_norm(parts.unique))
        row["srank_gap"] = abs(row["srank_merged"] - row["srank_common"])
        for beta in betas:
            row[f"srank_boosted_{beta:g}"] = stable_rank(subspace_boost(parts.merged, float(beta)))
        rows.append(row)
    return pd.DataFrame(rows)


def prop3_table(
    tv: SyntheticTaskVectors, task_counts: Sequence[int], alphas: Sequence[float]
) -> pd.DataFrame:
    """Prop. 3 (Eq. 22-28): Task Arithmetic Δm = α Σ Δi for each α. Per (N, α): the spectral
    and Frobenius norms of Δcommon and Δunique, their ratios, and the paper's lower bounds

    - Frobenius ratio ≥ μmin √ρ̄ / B · √N (Eq. 26),
    - spectral ratio ≥ μmin √ρ̄ / (B √r) · √N (Eq. 27-28, with ‖Δcommon‖2 ≥ ‖Δcommon‖F/√r),

    where μmin = min ‖Ci‖F, ρ̄ the mean cosine similarity of the Ci over all N² pairs, B =
    max ‖Ei‖F and r the rank of Δcommon (numerical rank, tolerance 1e-10·σ1). Both bounds
    need every pairwise cosine ≥ 0, which :class:`SyntheticSpec` guarantees.
    """
    alphas = [float(a) for a in alphas]
    if not alphas or any(a <= 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
    rows = []
    for n in _check_counts(task_counts, tv.n_tasks):
        c = tv.common[:n]
        mu_min = float(torch.linalg.matrix_norm(c, "fro").min())
        rho = mean_cosine_similarity(c)
        b = tv.bound(n)
        for a in alphas:
            parts = tv.merge(n, alpha=a)
            sv = torch.linalg.svdvals(parts.common)
            rank = int((sv > 1e-10 * sv[0]).sum())
            row = dict(N=n, alpha=a, common_spectral=float(sv[0]), unique_spectral=spectral_norm(parts.unique),
                       common_frobenius=frobenius_norm(parts.common), unique_frobenius=frobenius_norm(parts.unique),
                       mu_min=mu_min, rho_bar=rho, B=b, common_rank=rank)
            row["ratio_spectral"] = row["common_spectral"] / row["unique_spectral"]
            row["ratio_frobenius"] = row["common_frobenius"] / row["unique_frobenius"]
            row["bound_frobenius"] = mu_min * math.sqrt(max(rho, 0.0)) / b * math.sqrt(n)
            row["bound_spectral"] = row["bound_frobenius"] / math.sqrt(rank)
            rows.append(row)
    return pd.DataFrame(rows)


def repeat_tables(
    table_fn, spec: SyntheticSpec, n_tasks: int, seeds: Sequence[int], *, device: str = "cpu",
    progress: bool = False, desc: str = "", **kwargs,
) -> pd.DataFrame:
    """Run ``table_fn(make_task_vectors(spec, n_tasks, seed=s), **kwargs)`` for every seed and
    concatenate the tables with a ``seed`` column. ``progress`` shows a tqdm bar."""
    seeds = list(seeds)
    it: Iterable[int] = seeds
    if progress:
        from tqdm import tqdm  # plain text bar: the book's kernels have no ipywidgets

        it = tqdm(seeds, desc=desc or getattr(table_fn, "__name__", "repeats"), leave=False)
    frames = []
    for s in it:
        df = table_fn(make_task_vectors(spec, n_tasks, seed=s, device=device), **kwargs)
        frames.append(df.assign(seed=s))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- Prop. 4


@dataclass(frozen=True)
class TailModel:
    """The spectral model of the proof of Prop. 4 (Supp. E.3), one matrix in its own singular
    basis (all directions orthonormal, the matrix is square of size head + signal + noise).

    Attributes:
        head: singular values above the boosting threshold, kept by both methods; the last
            entry *is* σβ, the value the boosted tail is clamped to.
        signal: singular values of the ideal Δsignal in the tail directions.
        suppression: c ∈ (0, 1), the factor Task Arithmetic keeps of the signal (Prop. 1
            suggests c ≈ 1/√N). The proof takes the limit c → 0 while assuming the direction
            survives (its Assumption 1); c = 0 itself would erase the direction, so use a
            small positive c for the limit.
        noise: singular values of the noise directions in the TA tail (the ideal is 0 there);
            d_noise = len(noise). The proof's limit is 0.
    """

    head: tuple[float, ...]
    signal: tuple[float, ...]
    suppression: float = 0.0
    noise: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.head or any(h <= 0 for h in self.head) or list(self.head) != sorted(self.head, reverse=True):
            raise ValueError(f"head must be positive and descending, got {self.head}")
        if not 0.0 < self.suppression < 1.0:
            raise ValueError(
                f"suppression must lie in (0, 1), got {self.suppression}: at c = 0 the TA tail "
                "of the signal is exactly zero, its singular directions are undefined, and no "
                "method can recover them (Assumption 1 of the proof needs the direction kept)")
        sb = self.sigma_beta
        tail = [self.suppression * s for s in self.signal] + list(self.noise)
        if any(t < 0 or t >= sb for t in tail):
            raise ValueError("every TA tail value (c·signal, noise) must lie in [0, σβ) "
                             f"with σβ = {sb}; got {tail}")
        if any(s < 0 for s in self.signal):
            raise ValueError("signal singular values must be ≥ 0")

    @property
    def sigma_beta(self) -> float:
        return float(self.head[-1])

    @property
    def d_noise(self) -> int:
        return len(self.noise)

    @property
    def signal_energy(self) -> float:
        """‖Δsignal‖F² = Σ s_j²."""
        return float(sum(s * s for s in self.signal))

    @property
    def size(self) -> int:
        return len(self.head) + len(self.signal) + len(self.noise)

    def paper_criterion(self) -> bool:
        """Prop. 4, Eq. 29: boosting helps iff ‖Δsignal‖F² > d_noise·σβ²."""
        return self.signal_energy > self.d_noise * self.sigma_beta**2

    def exact_losses(self) -> tuple[float, float]:
        """Closed-form (L_TA, L_boost) of this model, without the proof's limits:

        L_TA    = Σ (1 − c)² s_j² + Σ ε_k²,
        L_boost = Σ (σβ − s_j)² + d_noise·σβ².

        In the proof's limit c → 0, ε = 0 and with s_j = σβ they reduce to the proof's ‖Δsignal‖F² and
        d_noise·σβ², so the sign of L_TA − L_boost is exactly Eq. 29.
        """
        c, sb = self.suppression, self.sigma_beta
        l_ta = sum(((1 - c) * s) ** 2 for s in self.signal) + sum(e * e for e in self.noise)
        l_boost = sum((sb - s) ** 2 for s in self.signal) + self.d_noise * sb * sb
        return float(l_ta), float(l_boost)


def beta_for_cutoff(singular_values: Sequence[float] | Tensor, index: int) -> float:
    """A β for which Alg. 1 picks ``index`` as the cutoff of this descending spectrum: the
    midpoint between the normalised cumulative sums at index − 1 and index (0 for index 0),
    so float rounding of a recomputed spectrum cannot move the cutoff."""
    s = torch.as_tensor(singular_values, dtype=DTYPE)
    if not 0 <= index < s.numel():
        raise ValueError(f"index must lie in [0, {s.numel() - 1}], got {index}")
    if index == 0:
        return 0.0
    r = torch.cumsum(s, 0) / s.sum()
    return float((r[index - 1] + r[index]) / 2)


class Prop4Result(NamedTuple):
    loss_ta: float
    loss_boost: float
    beta: float
    cutoff_index: int


def prop4_losses(model: TailModel, *, seed: int = 0) -> Prop4Result:
    """Build Δ_TA and the ideal Δ* of a :class:`TailModel` in a random orthonormal basis, boost
    Δ_TA with the real Alg. 1 (:func:`subboost.boost.subspace_boost`) at the β that puts the
    cutoff on σβ, and measure L = ‖Δ̂ − Δ*‖F² for TA and for boosting (Supp. E.3).

    The head is identical in Δ_TA and Δ*, so both losses are losses on the spectral tail, as in
    the proof. Returns the measured losses, the β used and the cutoff index Alg. 1 chose.
    """
    size = model.size
    gen = torch.Generator().manual_seed(int(seed))
    u = _orthonormal(size, size, gen, torch.device("cpu"))
    v = _orthonormal(size, size, gen, torch.device("cpu"))
    c = model.suppression
    s_ta = torch.tensor(list(model.head) + [c * s for s in model.signal] + list(model.noise), dtype=DTYPE)
    s_ideal = torch.tensor(list(model.head) + list(model.signal) + [0.0] * model.d_noise, dtype=DTYPE)
    delta_ta = (u * s_ta) @ v.T
    delta_ideal = (u * s_ideal) @ v.T
    idx = len(model.head) - 1
    beta = beta_for_cutoff(torch.sort(s_ta, descending=True).values, idx)
    boosted = subspace_boost(delta_ta, beta)
    used = boost_cutoff_index(torch.linalg.svdvals(delta_ta), beta)
    l_ta = float(torch.linalg.matrix_norm(delta_ta - delta_ideal, "fro") ** 2)
    l_boost = float(torch.linalg.matrix_norm(boosted - delta_ideal, "fro") ** 2)
    return Prop4Result(l_ta, l_boost, beta, used)


def prop4_grid(
    signal_dims: Sequence[int],
    noise_dims: Sequence[int],
    *,
    sigma_beta: float = 1.0,
    head: Sequence[float] = (4.0, 2.0),
    signal_scale: float = 1.0,
    suppression: float = 1e-3,
    noise_level: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Sweep the dimensions of the signal (k_s) and of the noise (d_noise) of the Prop. 4
    model. Every signal singular value is ``signal_scale``·σβ (1 = the proof's assumption that
    σβ matches the signal), TA keeps ``suppression``·signal and ``noise_level``·σβ per noise
    direction. One row per (k_s, d_noise): measured and closed-form losses, the gain
    L_TA − L_boost, the ratio ‖Δsignal‖F² / (d_noise σβ²) and the paper's prediction."""
    rows = []
    for ks in signal_dims:
        for dn in noise_dims:
            model = TailModel(
                head=tuple(float(h) for h in head) + (float(sigma_beta),),
                signal=(signal_scale * sigma_beta,) * int(ks),
                suppression=suppression,
                noise=(noise_level * sigma_beta,) * int(dn),
            )
            res = prop4_losses(model, seed=seed + 1000 * int(ks) + int(dn))
            ex_ta, ex_boost = model.exact_losses()
            rows.append(dict(
                signal_dims=int(ks), d_noise=int(dn), sigma_beta=sigma_beta, suppression=suppression,
                noise_level=noise_level, signal_scale=signal_scale, signal_energy=model.signal_energy,
                ratio=model.signal_energy / (dn * sigma_beta**2) if dn else math.inf,
                loss_ta=res.loss_ta, loss_boost=res.loss_boost, gain=res.loss_ta - res.loss_boost,
                exact_loss_ta=ex_ta, exact_loss_boost=ex_boost, exact_gain=ex_ta - ex_boost,
                paper_predicts_gain=model.paper_criterion(), cutoff_index=res.cutoff_index,
                expected_cutoff=len(head),
            ))
    return pd.DataFrame(rows)


def prop4_scale_sweep(
    signal_scales: Sequence[float],
    *,
    signal_dims: int,
    noise_dims: int,
    suppression: float = 1e-3,
    noise_level: float = 0.0,
    sigma_beta: float = 1.0,
    head: Sequence[float] = (4.0, 2.0),
    seed: int = 0,
) -> pd.DataFrame:
    """Beyond the proof's assumption σβ = signal magnitude: sweep the signal singular values
    s = scale·σβ at fixed dimensions (TA keeps c·s, which must stay below σβ). Returns the
    same columns as :func:`prop4_grid`, one row per scale."""
    frames = [
        prop4_grid([signal_dims], [noise_dims], sigma_beta=sigma_beta, head=head, signal_scale=float(sc),
                   suppression=suppression, noise_level=noise_level, seed=seed)
        for sc in signal_scales
    ]
    return pd.concat(frames, ignore_index=True)


def prop4_exact_boundaries(signal_dims: int, noise_dims: int, suppression: float = 1e-3,
                           noise_level: float = 0.0) -> list[float]:
    """The signal scales s/σβ at which L_TA = L_boost in :meth:`TailModel.exact_losses`
    (k = ``signal_dims`` equal signal values s, d = ``noise_dims`` noise values
    ε = noise_level·σβ, σβ = 1, TA keeps c·s):

        k(1−c)² s² + d ε² = k(1 − s)² + d  ⇔  k[(1−c)² − 1] s² + 2k s − k − d(1 − ε²) = 0.

    For c > 0 the left side minus the right is a downward parabola: boosting wins between the
    two roots. Only roots inside the model's range 0 < s < 1/c (the TA value c·s must stay in
    the tail) are returned, ascending. The paper's Eq. 29 puts a single boundary at s = √(d/k).
    """
    k, d, c, e = float(signal_dims), float(noise_dims), float(suppression), float(noise_level)
    if k <= 0 or not 0 < c < 1:
        raise ValueError("need signal_dims ≥ 1 and suppression in (0, 1)")
    a = k * ((1 - c) ** 2 - 1)
    b = 2 * k
    cc = -k - d * (1 - e * e)
    disc = b * b - 4 * a * cc
    if disc < 0:
        return []
    roots = sorted([(-b + math.sqrt(disc)) / (2 * a), (-b - math.sqrt(disc)) / (2 * a)])
    return [r for r in roots if 0 < r < 1 / c]


# ----------------------------------------------------------------------------- Supp. E.4


def _merged_matrix(value: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(value, Tensor):
        if value.ndim == 2:
            return value
        if value.ndim == 3:
            return value.sum(0)
        raise ValueError(f"expected a 2-D merged matrix or a 3-D stack of task matrices, got shape {tuple(value.shape)}")
    mats = list(value)
    if not mats:
        raise ValueError("an empty list of task matrices")
    out = mats[0].to(DTYPE).clone()
    for m in mats[1:]:
        out += m.to(DTYPE)
    return out


def merged_spectra(task_vectors_by_N: Mapping[int, Tensor | Sequence[Tensor]]) -> dict[int, Tensor]:
    """Singular values (float64, CPU, descending) of the Task Arithmetic sum Σ_{i≤N} Δi for
    each N. Values may be a merged 2-D matrix, a stack (N, m, n) or a list of 2-D matrices
    (both summed)."""
    if not task_vectors_by_N:
        raise ValueError("task_vectors_by_N is empty")
    return {int(n): torch.linalg.svdvals(_merged_matrix(v).to(DTYPE)).cpu() for n, v in sorted(task_vectors_by_N.items())}


def normalised_spectra(
    task_vectors_by_N: Mapping[int, Tensor | Sequence[Tensor]], gammas: Sequence[float]
) -> pd.DataFrame:
    """Supp. E.4: the singular values of the merged task vector for each N, divided by N^γ for
    each γ. If a group of singular values scales as O(N^γ), its normalised curves for different
    N coincide (γ = 1: the common head, γ = 0.5: the unique tail).

    ``task_vectors_by_N`` maps N to the merged matrix of N tasks, or to the N task matrices
    themselves (a 3-D stack or a list, summed: Task Arithmetic with α = 1). Works for synthetic
    vectors and for one key of real task vectors alike (see :func:`merged_by_prefix`).

    Returns a tidy table: N, gamma, index (0-based), sigma, sigma_normalised.
    """
    gammas = [float(g) for g in gammas]
    if not gammas:
        raise ValueError("gammas must not be empty")
    frames = []
    for n, s in merged_spectra(task_vectors_by_N).items():
        for g in gammas:
            frames.append(pd.DataFrame(dict(N=n, gamma=g, index=np.arange(s.numel()), sigma=s.numpy(),
                                            sigma_normalised=s.numpy() / n**g)))
    return pd.concat(frames, ignore_index=True)


def merged_by_prefix(
    task_vectors: Sequence[Mapping[str, Tensor]] | Tensor, task_counts: Sequence[int], key: str | None = None
) -> dict[int, Tensor]:
    """{N: Σ_{i≤N} Δi} for nested prefixes of an ordered list of task vectors (the paper merges
    the first 4 / 8 / 14 / 20 tasks). Pass state dicts and a ``key`` (one block matrix of real
    task vectors) or a stack (T, m, n) of matrices without a key."""
    if isinstance(task_vectors, Tensor):
        mats = [task_vectors[i] for i in range(task_vectors.shape[0])]
    else:
        if key is None:
            raise ValueError("key is required when task_vectors are state dicts")
        mats = [tv[key] for tv in task_vectors]
    counts = _check_counts(task_counts, len(mats))
    out: dict[int, Tensor] = {}
    acc = torch.zeros_like(mats[0], dtype=DTYPE)
    done = 0
    for n in counts:
        for m in mats[done:n]:
            acc = acc + m.to(DTYPE)
        done = n
        out[n] = acc.clone()
    return out


def scaling_exponents(task_vectors_by_N: Mapping[int, Tensor | Sequence[Tensor]]) -> pd.DataFrame:
    """Per singular-value index k, the exponent γ_k of σ_k(Σ_{i≤N} Δi) ∝ N^γ_k fitted on
    log-log over the given N (needs ≥ 2 task counts). Supp. E.4 predicts γ ≈ 1 for the common
    head and γ ≈ 0.5 for the unique tail. Columns: index, gamma, gamma_stderr."""
    spectra = merged_spectra(task_vectors_by_N)
    if len(spectra) < 2:
        raise ValueError("scaling exponents need at least two task counts")
    ns = list(spectra)
    length = min(s.numel() for s in spectra.values())
    rows = []
    for k in range(length):
        ys = [float(spectra[n][k]) for n in ns]
        if min(ys) <= 0:
            continue
        fit = fit_loglog(ns, ys)
        rows.append(dict(index=k, gamma=fit.slope, gamma_stderr=fit.slope_stderr))
    return pd.DataFrame(rows)


def collapse_spread(
    task_vectors_by_N: Mapping[int, Tensor | Sequence[Tensor]], gammas: Sequence[float], indices: Sequence[int]
) -> pd.DataFrame:
    """How well the normalised curves collapse: for each γ, the mean over ``indices`` of the
    standard deviation across N of log(σ_k / N^γ) (0 = perfect collapse). Columns: gamma,
    spread."""
    spectra = merged_spectra(task_vectors_by_N)
    idx = list(indices)
    if not idx:
        raise ValueError("indices must not be empty")
    logs = np.stack([np.log(spectra[n].numpy()[idx]) for n in spectra])  # (len(N), len(idx))
    logn = np.log(np.array(list(spectra), float))[:, None]
    rows = [dict(gamma=float(g), spread=float((logs - g * logn).std(axis=0).mean())) for g in gammas]
    return pd.DataFrame(rows)


def e4_task_vectors(spec: SyntheticSpec, task_counts: Sequence[int], *, seed: int = 0,
                    device: str = "cpu") -> dict[int, Tensor]:
    """Synthetic stand-in for the paper's real task vectors in Supp. E.4: {N: Σ_{i≤N} Δi} for
    nested prefixes of max(task_counts) draws of :func:`make_task_vectors`."""
    counts = _check_counts(task_counts, max(int(c) for c in task_counts))
    tv = make_task_vectors(spec, counts[-1], seed=seed, device=device)
    return merged_by_prefix(tv.task_vectors(), counts)
