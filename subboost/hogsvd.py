"""HO-GSVD, alignment matrices, expert selection and Higher-Order Subspace Boosting.

Paper Sec. 4.2 (Eq. 5-7), Sec. 5.3, Supp. G (Alg. 2, Eq. 31-32) and Supp. H.

HO-GSVD (Eq. 5)
    N ≥ 2 matrices A_i (m_i × n) are factorised as A_i = U_i Σ_i Vᵀ with a *shared*, invertible
    V (n × n), non-negative diagonal Σ_i and U_i with unit-norm (not orthogonal) columns.
    The textbook definition takes V from the eigenvectors of (Eq. 31-32)

        S_π = 1/(N(N−1)) Σ_{i≠j} D_i D_j⁻¹,   D_i = A_iᵀA_i + π·AᵀA,   A = [A_1; …; A_N],

    which needs Gram matrices and their inverses (:func:`s_pi_pairwise`, :func:`s_pi`; kept
    as references for tests). :func:`hogsvd` uses the stable route of Kempf, Goulart & Duncan
    (2023) instead, which never forms or inverts an ill-conditioned Gram matrix:

    1. thin QR of the stacked A = Q R, Q = [Q_1; …; Q_N], QᵀQ = I;
    2. per block, QR of [Q_i; √π·I] = Q̂_i R̂_i, so R̂_iᵀR̂_i = Q_iᵀQ_i + π·I (its singular
       values lie in [√π, √(1+π)]: R̂_i⁻¹ is always well-conditioned);
    3. SVD [R̂_1⁻¹ … R̂_N⁻¹] = Z S Yᵀ (computed as the SVD of R_wᵀ from a QR of the tall
       transpose): Z orthogonal, τ = s²/N are the eigenvalues of
       T_π = (1/N) Σ_i (Q_iᵀQ_i + π·I)⁻¹;
    4. V = RᵀZ, B_i = Q_i Z (so A_i = Q_i R = B_i Vᵀ exactly), Σ_i = column norms of B_i,
       U_i = B_i Σ_i⁻¹.

    Relation to S_π: D_i = Rᵀ R̂_iᵀ R̂_i R and Σ_i D_i = (1 + Nπ)·RᵀR, so with the identity
    Σ_{i≠j} D_i D_j⁻¹ = (Σ_i D_i)(Σ_j D_j⁻¹) − N·I one gets S_π V = V Λ with
    λ_k = ((1 + Nπ)·τ_k − 1)/(N − 1) (:attr:`HOGSVD.s_pi_eigenvalues`). τ lies in
    [N/(1 + Nπ), (N−1)/(Nπ) + 1/(N(1+π))]; the lower end (λ = 1) marks directions *common*
    to all matrices, the upper end directions used by exactly one matrix (*isolated*, the
    "unique" subspace of Eq. 6).

Conventions chosen here (documented because the HO-GSVD is not unique):

- V has unit-norm columns (Ponnapalli et al. 2011), so Σ_i carries the magnitudes and, for
  N identical matrices, the HO-GSVD *is* the SVD (σ_i = singular values). Kempf et al. keep
  V = RᵀZ unnormalised (then Σ_i σ_ik² = 1 for every direction k). Ratios σ_ik/σ_jk, and hence Eq. 7, do not
  depend on this choice.
- Directions are sorted by τ, descending (most unique first); each column of V is signed so
  that its largest-magnitude entry is positive.
- Degenerate τ (within ``cluster_rtol``·(τmax − τmin)) leave V undetermined inside the
  eigenspace. Isolated directions are first split by owner (the matrix that uses them), then
  inside every degenerate group the basis is rotated so that the columns of V are orthogonal
  (SVD of RᵀZ restricted to the group). This is exact (Z stays orthogonal) and makes, e.g.,
  N identical matrices decompose into their SVD.
- Rank-deficient stack (rank A = r < n, e.g. Σ m_i < n or all A_i sharing a low-rank row
  space): then R is singular and the regularised D_i are singular on null(A), so S_π is not
  defined there. We run the route above on the row space of A (A = Q R with R = S_r W_rᵀ the
  r × n factor of an SVD of the QR's R, which makes every R̂_i invertible again), and
  complete V with an orthonormal basis of null(A). On those n − r directions every
  σ_ik = 0 (no matrix uses them), τ = τmin (λ = 1: the limit of adding δ·I to every D_i,
  δ → 0; they are "common", not unique) and the U columns are an arbitrary unit vector
  (e_1). :attr:`HOGSVD.rank` = r; the null directions are the last n − r columns.
  Kempf et al.'s own code instead pads A with a fictitious (N+1)-th matrix.
- A σ_ik whose HO-CSD value ‖B_i e_k‖ ≤ 100·eps (numerically unused direction) is set to 0
  and the U column to e_1.

Orientation: HO-GSVD shares the *right* factor. :func:`alignment_matrix` and
:func:`higher_order_subspace_boost` decompose wide matrices (m < n, e.g. CLIP's
``mlp.c_proj.weight``, 768 × 3072) transposed by default (``transpose_wide=True``), so that
the shared factor is the smaller dimension: the stack of generic (full-rank) task matrices
is then full rank for any N (no null(A) directions diluting the 1/M_l of Eq. 7), and in
Alg. 2 the orthonormalised U has orthonormal columns, so the boosted Σ are exactly the
singular values of the rebuilt matrix.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from subboost.boost import boost_singular_values
from subboost.spectral import polar_factor
from subboost.taskvector import LAYER_TYPES, StateDict, all_finite, check_same_structure, is_zero, select_block_keys

Solver = Literal["svd", "eigh"]

ALIGNMENT_EPS = 1e-12  # ε of Eq. 7


# ---------------------------------------------------------------- input handling


def _check_pi(pi: float, allow_zero: bool = False) -> float:
    pi = float(pi)
    if not math.isfinite(pi) or pi < 0 or (pi == 0 and not allow_zero):
        raise ValueError(f"pi must be {'≥' if allow_zero else '>'} 0, got {pi}")
    return pi


def _as_matrices(matrices: Sequence[Any], dtype: torch.dtype) -> list[Tensor]:
    """Validate N ≥ 2 finite 2-D matrices with equal column counts; cast to ``dtype``."""
    if isinstance(matrices, Tensor):
        if matrices.ndim != 3:
            raise ValueError(f"expected a sequence of 2-D matrices or a 3-D tensor, got shape {tuple(matrices.shape)}")
        matrices = list(matrices)
    mats = [m if isinstance(m, Tensor) else torch.as_tensor(np.asarray(m)) for m in matrices]
    if len(mats) < 2:
        raise ValueError(f"HO-GSVD needs at least 2 matrices, got {len(mats)}")
    device = mats[0].device
    n = None
    out = []
    for i, m in enumerate(mats):
        if m.ndim != 2:
            raise ValueError(f"matrix {i}: expected a 2-D matrix, got shape {tuple(m.shape)}")
        if n is None:
            n = m.shape[1]
        elif m.shape[1] != n:
            raise ValueError(
                f"matrix {i}: has {m.shape[1]} columns, but matrix 0 has {n}; "
                "HO-GSVD needs the same number of columns n for every A_i (m_i may differ)"
            )
        if m.shape[0] == 0 or m.shape[1] == 0:
            raise ValueError(f"matrix {i}: empty matrix of shape {tuple(m.shape)}")
        m = m.detach().to(device=device, dtype=dtype)
        if not all_finite(m):
            raise ValueError(f"matrix {i}: contains NaN or Inf values")
        out.append(m)
    return out


def tau_bounds(n_matrices: int, pi: float) -> tuple[float, float]:
    """(τmin, τmax) = (N/(1 + Nπ), (N−1)/(Nπ) + 1/(N(1+π))): the range of the eigenvalues τ of
    T_π = (1/N) Σ_i (Q_iᵀQ_i + π·I)⁻¹ (Kempf et al. 2023). τmin: common to all matrices,
    τmax: used by a single matrix (isolated)."""
    n, pi = int(n_matrices), _check_pi(pi)
    return n / (1.0 + n * pi), (n - 1) / (n * pi) + 1.0 / (n * (1.0 + pi))


def _default_rtols(dtype: torch.dtype) -> tuple[float, float]:
    eps = torch.finfo(dtype).eps
    return max(1e-6, 1e4 * eps), max(1e-9, 1e3 * eps)  # isolated, cluster


# ---------------------------------------------------------------- HO-GSVD


@dataclass(frozen=True, eq=False)
class HOGSVD:
    """A_i = U[i] @ diag(sigma[i]) @ V.T, i = 1..N (paper Eq. 5).

    Attributes
    ----------
    U: N matrices m_i × n with unit-norm columns.
    sigma: N × n, non-negative generalised singular values (row i belongs to A_i).
    V: n × n shared right basis, unit-norm columns, invertible (not orthogonal in general).
    tau: n eigenvalues of T_π = (1/N) Σ_i (Q_iᵀQ_i + π·I)⁻¹ (Kempf et al.'s τ), descending;
        the eigenvalues of the paper's S_π (Eq. 31) are :attr:`s_pi_eigenvalues`.
    isolated: n booleans: τ_k ≥ τmax − isolated_rtol·(τmax − τmin), i.e. direction k is used
        by exactly one matrix (:attr:`owner`).
    pi: the regularisation π of Eq. 32.
    rank: rank r of the stacked A; columns r..n−1 of V span null(A) (σ = 0 for every i).
    """

    U: list[Tensor]
    sigma: Tensor
    V: Tensor
    tau: Tensor
    isolated: Tensor
    pi: float = 1e-2
    rank: int = -1

    @property
    def n_matrices(self) -> int:
        return int(self.sigma.shape[0])

    def reconstruct(self, i: int) -> Tensor:
        """U_i diag(σ_i) Vᵀ (Eq. 5)."""
        return (self.U[i] * self.sigma[i].unsqueeze(0)) @ self.V.T

    @property
    def s_pi_eigenvalues(self) -> Tensor:
        """λ_k = ((1 + Nπ)·τ_k − 1)/(N − 1): eigenvalues of S_π (Eq. 31) with S_π V = V diag(λ);
        λ = 1 for common directions."""
        n = self.n_matrices
        return ((1.0 + n * self.pi) * self.tau - 1.0) / (n - 1)

    @property
    def owner(self) -> Tensor:
        """For each isolated direction the index of the matrix that uses it, −1 elsewhere."""
        own = torch.argmax(self.sigma, dim=0)
        return torch.where(self.isolated, own, torch.full_like(own, -1))


def _orthogonalise_v_in_group(z_group: Tensor, r_mat: Tensor) -> Tensor:
    """Rotate an orthonormal basis Z_g of a degenerate eigenspace so that the columns of
    RᵀZ_g G are orthogonal (G from the SVD of RᵀZ_g)."""
    if z_group.shape[1] < 2:
        return z_group
    _, _, gh = torch.linalg.svd(r_mat.T @ z_group, full_matrices=False)
    return z_group @ gh.T


def _split_isolated_by_owner(z_iso: Tensor, q_blocks: list[Tensor]) -> list[Tensor] | None:
    """Split the isolated eigenspace (all τ = τmax, so any mixture across matrices is an
    eigenbasis) into the directions of each owner: right singular vectors of Q_i Z_iso with
    ‖Q_i z‖² > 1/2 (it is 1 for the owner and 0 for every other matrix). ``None`` when the
    pieces do not add up (not truly isolated); the caller then keeps Z_iso."""
    parts = []
    for q in q_blocks:
        _, s, vh = torch.linalg.svd(q @ z_iso, full_matrices=False)
        keep = s.square() > 0.5
        if bool(keep.any()):
            parts.append(z_iso @ vh[keep].T)
    if sum(p.shape[1] for p in parts) != z_iso.shape[1]:
        return None
    return parts


def hogsvd(
    matrices: Sequence[Tensor] | Tensor,
    pi: float = 1e-2,
    *,
    dtype: torch.dtype = torch.float64,
    solver: Solver = "svd",
    isolated_rtol: float | None = None,
    cluster_rtol: float | None = None,
    rank_rtol: float | None = None,
) -> HOGSVD:
    """HO-GSVD of N ≥ 2 matrices A_i (m_i × n; m_i may differ), paper Eq. 5 with the
    π-regularisation of Eq. 32, by the QR route of Kempf, Goulart & Duncan (2023) (see the
    module docstring for the algorithm, the conventions and the rank-deficient case).

    Parameters
    ----------
    matrices: sequence of 2-D tensors/arrays (or one 3-D tensor); float32/bfloat16 inputs are
        cast to ``dtype`` (float64 by default) on the device of the first matrix.
    pi: π > 0 (the paper uses 1e-2, Kempf et al. 1e-3).
    solver: ``"svd"`` (Kempf et al.: SVD of [R̂_1⁻¹ … R̂_N⁻¹]) or ``"eigh"`` (eigendecomposition
        of Σ_i R̂_i⁻¹R̂_i⁻ᵀ = N·T_π, never inverted; its condition number is τmax/τmin < 1 + 1/π,
        so forming it loses nothing dangerous; same results to ~1e-10 in float64).
    isolated_rtol: τ_k counts as isolated when τmax − τ_k ≤ isolated_rtol·(τmax − τmin)
        (default 1e-6 in float64 as Kempf et al.; 1e4·eps in lower precision).
    cluster_rtol: τ values closer than cluster_rtol·(τmax − τmin) are treated as degenerate
        (default 1e-9 in float64, 1e3·eps otherwise).
    rank_rtol: singular values of the stacked A below rank_rtol·s_max count as zero
        (default max(Σm_i, n)·eps of the compute ``dtype``: inputs are taken as exact, so a
        low-rank matrix rounded to float32 is full rank with tiny singular values).

    Raises ``ValueError`` for fewer than 2 matrices, non-2-D inputs, differing column counts
    (naming the matrix index), NaN/Inf entries or π ≤ 0.
    """
    pi = _check_pi(pi)
    if solver not in ("svd", "eigh"):
        raise ValueError(f"solver must be 'svd' or 'eigh', got {solver!r}")
    mats = _as_matrices(matrices, dtype)
    n_mat = len(mats)
    n = mats[0].shape[1]
    rows = [m.shape[0] for m in mats]
    device = mats[0].device
    eps = torch.finfo(dtype).eps
    iso_default, cluster_default = _default_rtols(dtype)
    isolated_rtol = iso_default if isolated_rtol is None else float(isolated_rtol)
    cluster_rtol = cluster_default if cluster_rtol is None else float(cluster_rtol)
    tau_min, tau_max = tau_bounds(n_mat, pi)
    span = tau_max - tau_min
    eye_n = torch.eye(n, dtype=dtype, device=device)

    # 1. thin QR of the stacked A, with the rank decided on the small factor R0.
    a = torch.cat(mats, dim=0)
    q0, r0 = torch.linalg.qr(a, mode="reduced")
    svals = torch.linalg.svdvals(r0)
    s_max = float(svals[0]) if svals.numel() else 0.0
    if rank_rtol is None:
        rank_rtol = max(a.shape) * eps
    rank = int((svals > rank_rtol * s_max).sum()) if s_max > 0 else 0
    if rank == 0:  # every A_i is zero: nothing is used, every direction is trivially common
        e1 = [torch.zeros(m, n, dtype=dtype, device=device) for m in rows]
        for u in e1:
            u[0, :] = 1.0
        return HOGSVD(
            U=e1, sigma=torch.zeros(n_mat, n, dtype=dtype, device=device), V=eye_n,
            tau=torch.full((n,), tau_min, dtype=dtype, device=device),
            isolated=torch.zeros(n, dtype=torch.bool, device=device), pi=pi, rank=0,
        )
    null_basis = None
    if rank == n:
        q, r_mat = q0, r0
    else:
        p, s, wh = torch.linalg.svd(r0, full_matrices=True)
        q = q0 @ p[:, :rank]
        r_mat = s[:rank].unsqueeze(1) * wh[:rank]  # r × n, full row rank
        null_basis = wh[rank:].T  # n × (n − r)
    q_blocks = list(torch.split(q, rows, dim=0))

    # 2. R̂_i from QR of [Q_i; √π I] and its (well-conditioned) inverse.
    eye_r = torch.eye(rank, dtype=dtype, device=device)
    inverses = []
    for qi in q_blocks:
        r_hat = torch.linalg.qr(torch.cat([qi, math.sqrt(pi) * eye_r], dim=0), mode="r")[1]
        inverses.append(torch.linalg.solve_triangular(r_hat, eye_r, upper=True))

    # 3. Z and τ.
    if solver == "svd":
        # SVD of the wide r × Nr matrix through a QR of its transpose: [R̂_1⁻¹ … R̂_N⁻¹]ᵀ = Q_w R_w,
        # so [R̂_1⁻¹ … R̂_N⁻¹] = R_wᵀ Q_wᵀ has the left singular vectors and values of R_wᵀ.
        r_w = torch.linalg.qr(torch.cat([inv.T for inv in inverses], dim=0), mode="r")[1]
        z, s_w, _ = torch.linalg.svd(r_w.T, full_matrices=False)
        tau = s_w.square() / n_mat
    else:
        m_sum = sum(inv @ inv.T for inv in inverses)
        evals, z = torch.linalg.eigh(0.5 * (m_sum + m_sum.T))
        tau, z = evals.flip(0) / n_mat, z.flip(1)
    order = torch.argsort(tau, descending=True, stable=True)
    tau, z = tau[order], z[:, order]

    # 4. Fix the basis inside degenerate eigenspaces (isolated: by owner first).
    isolated = (tau_max - tau) <= isolated_rtol * span
    n_iso = int(isolated.sum())
    cols: list[Tensor] = []
    if n_iso > 0:
        parts = _split_isolated_by_owner(z[:, :n_iso], q_blocks) if n_iso > 1 else [z[:, :n_iso]]
        if parts is None:
            parts = [z[:, :n_iso]]
        cols.extend(_orthogonalise_v_in_group(p_, r_mat) for p_ in parts)
    start = n_iso
    tau_host = tau.detach().cpu()
    while start < rank:
        stop = start + 1
        while stop < rank and float(tau_host[stop - 1] - tau_host[stop]) <= cluster_rtol * span:
            stop += 1
        cols.append(_orthogonalise_v_in_group(z[:, start:stop], r_mat))
        start = stop
    z = torch.cat(cols, dim=1)

    # 5. V = RᵀZ (unit columns), B_i = Q_i Z, Σ_i = column norms (× ‖v_k‖), U_i = B_i / ‖B_i‖.
    v_raw = r_mat.T @ z
    v_norm = torch.linalg.vector_norm(v_raw, dim=0)
    v = v_raw / v_norm
    zero_tol = 100 * eps
    us, sig = [], []
    for qi in q_blocks:
        b = qi @ z
        b_norm = torch.linalg.vector_norm(b, dim=0)
        used = b_norm > zero_tol
        u = torch.where(used.unsqueeze(0), b / torch.where(used, b_norm, torch.ones_like(b_norm)), torch.zeros_like(b))
        u[0, ~used] = 1.0
        us.append(u)
        sig.append(torch.where(used, b_norm * v_norm, torch.zeros_like(b_norm)))
    sigma = torch.stack(sig)

    # 6. Append null(A) (σ = 0, τ = τmin), then make each V column's largest entry positive.
    if null_basis is not None:
        k = n - rank
        v = torch.cat([v, null_basis], dim=1)
        sigma = torch.cat([sigma, torch.zeros(n_mat, k, dtype=dtype, device=device)], dim=1)
        tau = torch.cat([tau, torch.full((k,), tau_min, dtype=dtype, device=device)])
        isolated = torch.cat([isolated, torch.zeros(k, dtype=torch.bool, device=device)])
        fill = []
        for u in us:
            extra = torch.zeros(u.shape[0], k, dtype=dtype, device=device)
            extra[0] = 1.0
            fill.append(torch.cat([u, extra], dim=1))
        us = fill
    idx = torch.argmax(v.abs(), dim=0)
    sign = torch.sign(v.gather(0, idx.unsqueeze(0)).squeeze(0))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    v = v * sign
    flip = sign < 0
    us = [torch.where(flip.unsqueeze(0) & (sigma[i] > 0).unsqueeze(0), -u, u) for i, u in enumerate(us)]
    return HOGSVD(U=us, sigma=sigma, V=v, tau=tau, isolated=isolated, pi=pi, rank=rank)


# ---------------------------------------------------------------- textbook S_π (references)


def _gram_terms(matrices: Sequence[Tensor], pi: float) -> list[Tensor]:
    pi = _check_pi(pi, allow_zero=True)
    mats = _as_matrices(matrices, torch.float64)
    grams = [m.T @ m for m in mats]
    total = sum(grams)
    return [g + pi * total for g in grams]


def s_pi_pairwise(matrices: Sequence[Tensor], pi: float = 1e-2) -> Tensor:
    """Textbook S_π of Eq. 31-32 in float64: D_i = A_iᵀA_i + π·AᵀA and
    S_π = 1/(N(N−1)) Σ_{i≠j} D_i D_j⁻¹, with N inverses and N(N−1) products.

    Reference only: it forms Gram matrices (squared condition numbers) and inverts them;
    a singular D_j raises ``torch.linalg.LinAlgError``."""
    d = _gram_terms(matrices, pi)
    n_mat = len(d)
    inv = [torch.linalg.inv(dj) for dj in d]
    acc = torch.zeros_like(d[0])
    for i in range(n_mat):
        for j in range(n_mat):
            if i != j:
                acc += d[i] @ inv[j]
    return acc / (n_mat * (n_mat - 1))


def s_pi(
    matrices: Sequence[Tensor], pi: float = 1e-2, *, route: Literal["auto", "lapack", "torch"] = "auto"
) -> Tensor:
    """S_π of Eq. 31 in float64 through the identity
    Σ_{i≠j} D_i D_j⁻¹ = (Σ_i D_i)(Σ_j D_j⁻¹) − N·I: N Cholesky inverses and one product
    instead of N(N−1) products. Σ_i D_i = (1 + Nπ)·AᵀA comes for free; the D_j are symmetric
    positive definite for π > 0, so their inverses go through Cholesky (half the flops of an
    LU inverse) and only one triangle of every Gram matrix and inverse is formed.

    route: ``"lapack"`` (CPU only) calls BLAS/LAPACK's symmetric kernels directly through
        SciPy, one matrix at a time: ``syrk`` for the Grams, ``potrf`` + ``potri`` for the
        inverses, upper triangles summed; ``"torch"`` runs batched torch kernels (any device);
        ``"auto"`` takes ``"lapack"`` for CPU tensors when SciPy is installed. Both give S_π to
        float64 rounding (tested against :func:`s_pi_pairwise`).

    Same caveats as :func:`s_pi_pairwise`: a singular D_j (π = 0 with a rank-deficient A_j)
    raises ``torch.linalg.LinAlgError`` naming j."""
    if route not in ("auto", "lapack", "torch"):
        raise ValueError(f"route must be 'auto', 'lapack' or 'torch', got {route!r}")
    pi = _check_pi(pi, allow_zero=True)
    first = matrices[0] if len(matrices) else None
    device = first.device if isinstance(first, Tensor) else torch.device("cpu")
    on_cpu = device.type == "cpu"
    if route == "lapack" and not on_cpu:
        raise ValueError(f"route='lapack' needs CPU tensors, got device {device}")
    mats = _as_matrices(matrices, torch.float64)
    if route == "auto":
        route = "lapack" if on_cpu and _scipy_lapack() is not None else "torch"
    n_mat = len(mats)
    if route == "lapack":
        total, inv_sum = _s_pi_terms_lapack(mats, pi)
    else:
        total, inv_sum = _s_pi_terms_torch(mats, pi)
    out = total @ inv_sum
    out.mul_((1.0 + n_mat * pi) / (n_mat * (n_mat - 1)))
    out.diagonal().sub_(1.0 / (n_mat - 1))
    return out


def _not_pd(j: int, pi: float) -> torch.linalg.LinAlgError:
    return torch.linalg.LinAlgError(f"s_pi: D_{j} = A_{j}ᵀA_{j} + π·AᵀA is not positive definite (π = {pi})")


def _scipy_lapack() -> Any:
    try:
        from scipy.linalg import blas, lapack
    except ImportError:  # scipy is optional for the library core
        return None
    return blas, lapack


def _s_pi_terms_torch(mats: list[Tensor], pi: float) -> tuple[Tensor, Tensor]:
    """AᵀA and Σ_j D_j⁻¹ with batched torch kernels: Grams (symmetry used, see
    :func:`subboost.boost._gram`) in one buffer that then holds the D_j and their Cholesky factors."""
    from subboost.boost import _gram

    n_mat, n = len(mats), mats[0].shape[1]
    d = torch.empty(n_mat, n, n, dtype=torch.float64, device=mats[0].device)
    for j, m in enumerate(mats):
        d[j] = _gram(m.unsqueeze(0), True, torch.float64)[0]
    total = d.sum(0)  # AᵀA
    d.add_(total, alpha=pi)
    info = torch.empty(n_mat, dtype=torch.int32, device=d.device)
    torch.linalg.cholesky_ex(d, out=(d, info))
    if bool((info != 0).any()):
        raise _not_pd(int((info != 0).nonzero()[0]), pi)
    inv_sum = torch.zeros(n, n, dtype=torch.float64, device=d.device)
    for j in range(n_mat):
        inv_sum += torch.cholesky_inverse(d[j])
    return total, inv_sum


def _s_pi_terms_lapack(mats: list[Tensor], pi: float) -> tuple[Tensor, Tensor]:
    """AᵀA and Σ_j D_j⁻¹ with SciPy's BLAS/LAPACK on upper triangles (Fortran order, no
    copies of the inputs): ``syrk`` (half a product) per Gram, then per j D_j = G_j + π·AᵀA
    in place, ``potrf`` and ``potri`` overwriting it. BLAS threads follow
    ``torch.get_num_threads()`` while it runs (when threadpoolctl is installed)."""
    blas, lapack = _scipy_lapack()
    with _blas_threads(torch.get_num_threads()):
        grams = []
        total = None
        for m in mats:
            # syrk(a) = a·aᵀ; with a = A_jᵀ (Fortran-ordered view of a C-ordered A_j) that is A_jᵀA_j
            g = blas.dsyrk(1.0, m.numpy().T, lower=0)
            grams.append(g)
            if total is None:
                total = g.copy(order="F")
            else:
                total += g
        inv_sum = np.zeros_like(total, order="F")
        pi_total = pi * total
        for j, g in enumerate(grams):
            g += pi_total
            c, info = lapack.dpotrf(g, lower=0, clean=1, overwrite_a=1)
            if info != 0:
                raise _not_pd(j, pi)
            c, info = lapack.dpotri(c, lower=0, overwrite_c=1)
            if info != 0:
                raise _not_pd(j, pi)
            inv_sum += c  # upper triangle; the lower one is zero (clean=1)
            grams[j] = None
    total_t = torch.from_numpy(np.ascontiguousarray(_symmetrise_upper(total)))
    inv_t = torch.from_numpy(np.ascontiguousarray(_symmetrise_upper(inv_sum)))
    return total_t, inv_t


def _blas_threads(count: int) -> Any:
    """Context limiting the BLAS libraries NumPy/SciPy use to ``count`` threads (a no-op
    without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=count, user_api="blas")


def _symmetrise_upper(u: np.ndarray) -> np.ndarray:
    """Full symmetric matrix from its upper triangle (the strictly lower part of ``u`` is zero)."""
    return u + np.triu(u, 1).T


# ---------------------------------------------------------------- orientation helper


def _oriented(mats: list[Tensor], transpose_wide: bool) -> tuple[list[Tensor], bool]:
    m, n = mats[0].shape
    if transpose_wide and m < n:
        return [x.T for x in mats], True
    return mats, False


# ---------------------------------------------------------------- alignment matrix (Eq. 7)


def alignment_from_sigma(sigma: Tensor | np.ndarray, eps: float = ALIGNMENT_EPS) -> np.ndarray:
    """Inner term of Eq. 7 for one decomposed matrix: (1/M) Σ_p |log((σ_ip + ε)/(σ_jp + ε))|
    for every pair (i, j), from the N × M generalised singular values. Float64, symmetric,
    zero diagonal."""
    s = sigma.detach().cpu().double().numpy() if isinstance(sigma, Tensor) else np.asarray(sigma, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"sigma must be N × M, got shape {s.shape}")
    logs = np.log(s + eps)
    return np.abs(logs[:, None, :] - logs[None, :, :]).mean(axis=2)


@dataclass(frozen=True, eq=False)
class AlignmentResult:
    """Alignment matrix of Eq. 7 and its ingredients.

    matrix: N × N DataFrame (float64) labelled by the task names; symmetric, zero diagonal.
        **Higher = better aligned**: the two experts put their weight on *different* directions
        of the shared HO-GSVD basis (large |log σ_i/σ_j|), so they interfere less and are
        easier to merge (paper Sec. 4.2, Sec. 5.3, Fig. 5b); 0 = identical spectra in the
        shared basis (maximal overlap).
    per_layer: key → N × N array (the bracket of Eq. 7 for that matrix), for per-layer figures
        (Supp. H, Fig. 13).
    sigma: key → N × M array of generalised singular values (Fig. 5a).
    keys: the L matrices averaged, in order; names: the task names.
    """

    matrix: pd.DataFrame
    per_layer: dict[str, np.ndarray]
    sigma: dict[str, np.ndarray]
    keys: list[str]
    names: list[str]
    pi: float
    eps: float


def alignment_matrix(
    task_vectors: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping[str, Tensor]],
    keys: Iterable[str] | None = None,
    pi: float = 1e-2,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
    *,
    names: Sequence[str] | None = None,
    eps: float = ALIGNMENT_EPS,
    dtype: torch.dtype = torch.float64,
    solver: Solver = "svd",
    transpose_wide: bool = True,
) -> AlignmentResult:
    """Alignment matrix of N task vectors, paper Eq. 7:

        A_ij = (1/L) Σ_l (1/M_l) Σ_p |log((σ_ip^(l) + ε)/(σ_jp^(l) + ε))|,  ε = 1e-12,

    with σ^(l) from the HO-GSVD (:func:`hogsvd`, π = ``pi``) of the N task matrices of the l-th
    block matrix, M_l its number of generalised singular values.

    Direction (paper Sec. 4.2, 5.3): *well-aligned* experts rely on different subspaces; a
    **higher** A_ij means less interference (easier to merge), A_ij = 0 means the same
    weight on every shared direction. Expert selection therefore *maximises* alignment with
    the pool (:func:`select_experts`).

    ``task_vectors``: a sequence of state dicts or a mapping name → state dict (names label
    the result; otherwise ``names`` or "task 0", "task 1", ...). ``keys`` default to
    :func:`subboost.taskvector.select_block_keys` of the first task vector (``layer_types``,
    ``include_proj``); matrices that are all-zero in every task (e.g. a frozen tower) are
    skipped. Wide matrices are decomposed transposed (``transpose_wide``, see the module
    docstring).
    """
    if isinstance(task_vectors, Mapping):
        names = list(task_vectors) if names is None else list(names)
        vectors = [task_vectors[k] for k in task_vectors]
    else:
        vectors = list(task_vectors)
        names = [f"task {i}" for i in range(len(vectors))] if names is None else list(names)
    if len(vectors) < 2:
        raise ValueError(f"an alignment matrix needs at least 2 task vectors, got {len(vectors)}")
    if len(names) != len(vectors):
        raise ValueError(f"{len(names)} names for {len(vectors)} task vectors")
    check_same_structure(vectors, [str(x) for x in names])
    if keys is None:
        keys = select_block_keys(vectors[0], layer_types, include_proj)
    keys = list(keys)
    per_layer: dict[str, np.ndarray] = {}
    sigmas: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in vectors[0]:
            raise ValueError(f"key '{key}' is not in the task vectors")
        mats = [tv[key] for tv in vectors]
        if mats[0].ndim != 2:
            raise ValueError(f"key '{key}' is not a 2-D matrix (shape {tuple(mats[0].shape)})")
        if all(is_zero(m) for m in mats):
            continue
        mats, _ = _oriented(mats, transpose_wide)
        dec = hogsvd(mats, pi, dtype=dtype, solver=solver)
        sig = dec.sigma.detach().cpu().double().numpy()
        sigmas[key] = sig
        per_layer[key] = alignment_from_sigma(sig, eps)
    if not per_layer:
        raise ValueError("no non-zero block matrix to decompose (check keys / layer_types)")
    mean = np.mean(np.stack(list(per_layer.values())), axis=0)
    mean = 0.5 * (mean + mean.T)
    np.fill_diagonal(mean, 0.0)
    return AlignmentResult(
        matrix=pd.DataFrame(mean, index=list(names), columns=list(names)),
        per_layer=per_layer, sigma=sigmas, keys=list(per_layer), names=list(names), pi=float(pi), eps=float(eps),
    )


# ---------------------------------------------------------------- expert selection


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of :func:`select_experts`.

    selected: the k chosen candidates, labels as given, in candidate order (greedy:
        ``order`` keeps the order they were picked in); score: the objective J (higher =
        less interference); mean_alignment: J without ``within_weight`` divided by the number
        of pairs it sums (k·|pool| + k(k−1)/2); method: "greedy" or "exhaustive";
        n_evaluated: subsets scored (exhaustive) or marginal gains computed (greedy).
    """

    selected: list
    score: float
    mean_alignment: float
    method: str
    pool: list
    candidates: list
    order: list = field(default_factory=list)
    n_evaluated: int = 0


def _alignment_array(alignment: Any) -> tuple[np.ndarray, list[Hashable] | None]:
    if isinstance(alignment, AlignmentResult):
        alignment = alignment.matrix
    if isinstance(alignment, pd.DataFrame):
        if list(alignment.index) != list(alignment.columns):
            raise ValueError("alignment DataFrame must have the same labels on rows and columns")
        arr, labels = alignment.to_numpy(dtype=np.float64), list(alignment.index)
    elif isinstance(alignment, Tensor):
        arr, labels = alignment.detach().cpu().double().numpy(), None
    else:
        arr, labels = np.asarray(alignment, dtype=np.float64), None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"alignment must be a square matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("alignment matrix contains NaN or Inf values")
    return 0.5 * (arr + arr.T), labels


def _positions(items: Sequence[Hashable], labels: list[Hashable] | None, size: int, what: str) -> list[int]:
    out = []
    for item in items:
        if labels is not None and item in labels:
            out.append(labels.index(item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= int(item) < size:
            out.append(int(item))
        else:
            raise ValueError(f"{what}: {item!r} is neither a label of the alignment matrix nor an index < {size}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: duplicate entries {list(items)}")
    return out


def selection_score(
    alignment: Any, pool: Sequence[Hashable], selected: Sequence[Hashable], within_weight: float = 1.0
) -> float:
    """Objective of :func:`select_experts` for a given selection S:
    J(S) = Σ_{c∈S} Σ_{p∈pool} A_cp + within_weight·Σ_{c<c'∈S} A_cc' (higher = better aligned)."""
    arr, labels = _alignment_array(alignment)
    p = _positions(pool, labels, arr.shape[0], "pool")
    s = _positions(selected, labels, arr.shape[0], "selected")
    cross = arr[np.ix_(s, p)].sum() if p and s else 0.0
    within = arr[np.ix_(s, s)].sum() / 2.0 if s else 0.0
    return float(cross + within_weight * within)


def select_experts(
    alignment: Any,
    pool: Sequence[Hashable],
    candidates: Sequence[Hashable],
    k: int,
    method: Literal["greedy", "exhaustive", "auto"] = "auto",
    *,
    within_weight: float = 1.0,
    max_exhaustive: int = 200_000,
) -> SelectionResult:
    """Choose k of ``candidates`` that interfere least with ``pool`` (paper Sec. 5.3, Table 5;
    Supp. H, Table 10).

    Criterion: the alignment matrix (Eq. 7) is *higher* for better aligned, less interfering
    pairs, so we **maximise**

        J(S) = Σ_{c∈S} Σ_{p∈pool} A_cp + within_weight · Σ_{c<c'∈S} A_cc',

    the total alignment of every pair of the merged set pool ∪ S that involves a chosen expert
    (pool–pool pairs are constant). With an empty pool (Table 10: 8 of 20 experts) this is the
    total pairwise alignment of S; ``within_weight=0`` ranks candidates by their alignment
    with the pool alone (then greedy is exact).

    ``alignment``: :class:`AlignmentResult`, a labelled DataFrame, or an N × N array/tensor
    (symmetrised as (A + Aᵀ)/2). ``pool``/``candidates``: labels of the DataFrame or integer
    indices. ``method``: "greedy" (add the candidate with the largest marginal gain; ties →
    first in ``candidates``), "exhaustive" (all C(n, k) subsets, vectorised; ties → first in
    lexicographic order) or "auto" (exhaustive when C(n, k) ≤ ``max_exhaustive``; Table 5's
    C(14, 5) = 2002 and Table 10's C(20, 8) = 125970 are both exact).
    """
    arr, labels = _alignment_array(alignment)
    size = arr.shape[0]
    pool, candidates = list(pool), list(candidates)
    p = _positions(pool, labels, size, "pool")
    c = _positions(candidates, labels, size, "candidates")
    overlap = set(p) & set(c)
    if overlap:
        raise ValueError(f"candidates overlap the pool at positions {sorted(overlap)}")
    k = int(k)
    if not 0 <= k <= len(c):
        raise ValueError(f"k must lie in [0, {len(c)}] (number of candidates), got {k}")
    if method not in ("greedy", "exhaustive", "auto"):
        raise ValueError(f"method must be 'greedy', 'exhaustive' or 'auto', got {method!r}")
    w = float(within_weight)
    base = arr[np.ix_(c, p)].sum(axis=1) if p else np.zeros(len(c))
    sub = arr[np.ix_(c, c)]
    if method == "auto":
        method = "exhaustive" if math.comb(len(c), k) <= max_exhaustive else "greedy"

    if k == 0:
        order_idx, evaluated = [], 0
    elif method == "greedy":
        chosen: list[int] = []
        gain = base.copy()
        evaluated = 0
        for _ in range(k):
            masked = np.where(np.isin(np.arange(len(c)), chosen), -np.inf, gain)
            best = int(np.argmax(masked))
            evaluated += len(c) - len(chosen)
            chosen.append(best)
            gain = gain + w * sub[best]
        order_idx = chosen
    else:
        best_score, best_combo, evaluated = -np.inf, (), 0
        pairs = list(itertools.combinations(range(k), 2))
        combos_iter = itertools.combinations(range(len(c)), k)
        while True:
            chunk = np.array(list(itertools.islice(combos_iter, 65536)), dtype=np.int64).reshape(-1, k)
            if chunk.shape[0] == 0:
                break
            score = base[chunk].sum(axis=1)
            for a_, b_ in pairs:
                score = score + w * sub[chunk[:, a_], chunk[:, b_]]
            j = int(np.argmax(score))
            if score[j] > best_score:
                best_score, best_combo = float(score[j]), tuple(int(x) for x in chunk[j])
            evaluated += chunk.shape[0]
        order_idx = list(best_combo)
    sel_sorted = sorted(order_idx)
    selected = [candidates[i] for i in sel_sorted]
    cross = float(base[sel_sorted].sum())
    within = float(sub[np.ix_(sel_sorted, sel_sorted)].sum() / 2.0) if sel_sorted else 0.0
    n_pairs = len(sel_sorted) * len(p) + len(sel_sorted) * (len(sel_sorted) - 1) // 2
    return SelectionResult(
        selected=selected,
        score=cross + w * within,
        mean_alignment=(cross + within) / n_pairs if n_pairs else 0.0,
        method=method,
        pool=pool,
        candidates=candidates,
        order=[candidates[i] for i in order_idx],
        n_evaluated=int(evaluated),
    )


def random_selection(candidates: Sequence[Hashable], k: int, draws: int = 10, seed: int = 0) -> list[list]:
    """The random baseline of Table 5 (10 draws) and Table 10 (20 draws): ``draws`` subsets of
    k candidates without replacement, each in candidate order; deterministic for a seed
    (numpy ``default_rng(seed)``)."""
    candidates = list(candidates)
    k, draws = int(k), int(draws)
    if not 0 <= k <= len(candidates):
        raise ValueError(f"k must lie in [0, {len(candidates)}], got {k}")
    if draws < 1:
        raise ValueError(f"draws must be ≥ 1, got {draws}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        idx = np.sort(rng.choice(len(candidates), size=k, replace=False))
        out.append([candidates[int(i)] for i in idx])
    return out


# ---------------------------------------------------------------- Higher-Order SB (Alg. 2)


def ho_subspace_boost_matrix(
    matrices: Sequence[Tensor],
    beta: float = 0.0,
    pi: float = 1e-2,
    *,
    weighting: Literal["sigma", "none"] = "sigma",
    dtype: torch.dtype = torch.float64,
    solver: Solver = "svd",
    transpose_wide: bool = True,
) -> Tensor:
    """Alg. 2 for one block matrix: N task matrices (same shape) → one merged matrix.

    1. HO-GSVD A_i = U_i Σ_i Vᵀ (:func:`hogsvd`; wide matrices transposed);
    2.-3. generalised orthogonal Procrustes. Every rank-one term σ_ik u_ik v_kᵀ pulls the
       merged pair (u_k, v_k) towards its own directions with weight σ_ik:

           (U_o, V_o) = argmin Σ_i Σ_k σ_ik (‖u_k − u_ik‖² + ‖v_k − v̂_k‖²),  U_oᵀU_o = V_oᵀV_o = I,

       which (unit columns: ‖a − b‖² = 2 − 2aᵀb) decouples into two polar factors,
       U_o = polar(Σ_i U_iΣ_i) and V_o = polar(V̂ Σ_sum), Σ_sum = Σ_i Σ_i, V̂ the unit-column
       shared V (``weighting="sigma"``, default). Note Σ_i U_iΣ_i = (Σ_i A_i)V̂⁻ᵀ: U_o is the
       closest orthonormal matrix to the task *sum* written in the shared basis. With
       ``weighting="none"``: U_o = polar(Σ_i U_i) (argmin Σ_i ‖U − U_i‖²_F, every column alike,
       including columns a task does not use) and V_o = polar(V̂). On synthetic tests the
       σ-weighted pair rebuilds Σ_i A_i (before boosting) more closely, and both reduce to the
       SVD for identical inputs;
    4. Σ_sum = Σ_i Σ_i; sorted descending, boosted with Subspace Boosting
       (:func:`subboost.boost.boost_singular_values`, Alg. 1), permuted back;
    5. U_o diag(Σ_boosted) V_oᵀ.

    Only the row space of the stacked task matrices (:attr:`HOGSVD.rank` directions) is
    rebuilt and boosted: directions no task uses (σ = 0 for all i) stay zero instead of being
    lifted to the boosted level with arbitrary singular vectors.

    Returns the merged matrix in the dtype of ``matrices[0]``. An all-zero input gives zeros.
    """
    mats_in = list(matrices)
    out_dtype = mats_in[0].dtype if isinstance(mats_in[0], Tensor) else torch.float64
    shapes = {tuple(m.shape) for m in mats_in}
    if len(shapes) != 1:
        raise ValueError(f"Higher-Order SB needs task matrices of one shape, got {sorted(shapes)}")
    if weighting not in ("sigma", "none"):
        raise ValueError(f"weighting must be 'sigma' or 'none', got {weighting!r}")
    mats = _as_matrices(mats_in, dtype)
    if all(is_zero(m) for m in mats):
        return torch.zeros(mats[0].shape, dtype=out_dtype, device=mats[0].device)
    mats, transposed = _oriented(mats, transpose_wide)
    dec = hogsvd(mats, pi, dtype=dtype, solver=solver)
    r = dec.rank
    s_sum = dec.sigma[:, :r].sum(dim=0)
    if weighting == "sigma":
        u_o = polar_factor(sum(u[:, :r] * s[:r].unsqueeze(0) for u, s in zip(dec.U, dec.sigma)))
        v_o = polar_factor(dec.V[:, :r] * s_sum.unsqueeze(0))
    else:
        u_o = polar_factor(sum(u[:, :r] for u in dec.U))
        v_o = polar_factor(dec.V[:, :r])
    order = torch.argsort(s_sum, descending=True, stable=True)
    s_new = torch.empty_like(s_sum)
    s_new[order] = boost_singular_values(s_sum[order], beta)
    out = (u_o * s_new.unsqueeze(0)) @ v_o.T
    if transposed:
        out = out.T
    return out.to(out_dtype)


def higher_order_subspace_boost(
    task_vectors: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping[str, Tensor]],
    beta: float = 0.0,
    pi: float = 1e-2,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
    *,
    weighting: Literal["sigma", "none"] = "sigma",
    dtype: torch.dtype = torch.float64,
    solver: Solver = "svd",
    transpose_wide: bool = True,
) -> StateDict:
    """Higher-Order Subspace Boosting (paper Alg. 2, Supp. G) of N ≥ 2 task vectors.

    Every block matrix (:func:`subboost.taskvector.select_block_keys`: ``layer_types``,
    ``include_proj``) is merged by :func:`ho_subspace_boost_matrix` (HO-GSVD, Procrustes for
    U and V, summed and boosted Σ); matrices that are all-zero in every task come back as
    zeros; every other tensor is the mean of the task vectors (as the spectral methods of
    :mod:`subboost.merging`). The result is the merged update Δm (θm = θ0 + α·Δm); β = 0 as
    in the paper. Registered as ``"ho-sb"`` in :mod:`subboost.merging`.
    """
    if isinstance(task_vectors, Mapping):
        vectors = [task_vectors[k] for k in task_vectors]
        check_same_structure(vectors, [str(k) for k in task_vectors])
    else:
        vectors = list(task_vectors)
        check_same_structure(vectors)
    if len(vectors) < 2:
        raise ValueError(f"Higher-Order SB needs at least 2 task vectors, got {len(vectors)}")
    keys = set(select_block_keys(vectors[0], layer_types, include_proj))
    n_tv = len(vectors)
    out: StateDict = {}
    for key, ref in vectors[0].items():
        mats = [tv[key] for tv in vectors]
        if key in keys:
            if all(is_zero(m) for m in mats):
                out[key] = torch.zeros_like(ref)
            else:
                out[key] = ho_subspace_boost_matrix(
                    mats, beta, pi, weighting=weighting, dtype=dtype, solver=solver,
                    transpose_wide=transpose_wide,
                ).to(ref.dtype)
        else:
            work = torch.float64 if ref.dtype == torch.float64 else torch.float32
            if ref.is_floating_point():
                acc = sum(m.to(work) for m in mats) / n_tv
                out[key] = acc.to(ref.dtype)
            else:
                out[key] = ref.clone()
    return out
