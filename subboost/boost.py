"""Subspace Boosting (paper Sec. 4.1, Alg. 1).

For one matrix M of the merged task vector (after the base merging method, before α):

1. M = U diag(S) Vᵀ, S descending;
2. r = cumsum(S) / sum(S)  (plain S, not S²);
3. idx = first index with r ≥ β;
4. S' = max(S, S[idx])  (clamp from below); return U diag(S') Vᵀ.

β = 0 gives idx = 0, so every singular value becomes S[0]: SB(M) = S[0]·polar(M) with
polar(M) = U Vᵀ. SB is positively homogeneous, SB(cM) = c·SB(M) for c > 0, so it commutes
with α and with LiNeS' per-layer scalars, but not with element-wise masks: mask first,
boost second.

Which matrices: every block matrix (:func:`subboost.taskvector.select_block_keys`); how the
query/key/value projections are cut before boosting (CLIP's fused in_proj whole, per Q/K/V,
or per head) is ``attention`` of :func:`boost_task_vector` (:func:`attention_blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from subboost.taskvector import LAYER_TYPES, StateDict, all_finite, parse_block_key, select_block_keys


def _check_beta(beta: float, name: str = "beta") -> float:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {beta}")
    return beta


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Decompose in float32 at least; keep float64 inputs in float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def boost_cutoff_index(singular_values: Tensor, beta: float = 0.0) -> int:
    """Alg. 1 lines 3-6: first index where cumsum(S)/sum(S) ≥ β (S descending).

    Returns 0 for an all-zero spectrum. The comparison allows a few ulps of rounding, so
    β = 1 selects the last nonzero singular value, as in exact arithmetic.
    """
    beta = _check_beta(beta)
    s = singular_values
    total = s.sum()
    if total <= 0:
        return 0
    ratio = torch.cumsum(s, dim=0) / total
    # a few ulps of slack so that exact-arithmetic boundaries (e.g. β = 1 on a rank-deficient
    # matrix, whose ratio reaches 1 at the last nonzero value) do not depend on rounding
    slack = 8 * torch.finfo(ratio.dtype).eps
    hits = torch.nonzero(ratio >= beta - slack)
    return int(hits[0].item()) if hits.numel() else s.numel() - 1


def boost_singular_values(singular_values: Tensor, beta: float = 0.0) -> Tensor:
    """Clamp a descending spectrum from below at S[idx] (Alg. 1 line 7)."""
    idx = boost_cutoff_index(singular_values, beta)
    return torch.clamp(singular_values, min=singular_values[idx])


ROUTES = ("auto", "svd", "svd-tall", "gram", "polar")
"""Ways to compute Subspace Boosting. All give Alg. 1's result; they differ in speed and in
rounding. Error bounds are relative Frobenius distances to Alg. 1 computed in float64, for a
float32 input of full rank with κ = σ_max/σ_min ≤ :data:`MAX_COND`:

- ``"svd"``: the reference, paper Alg. 1 verbatim: one thin ``torch.linalg.svd`` of the
  matrix in float32 (float64 inputs stay float64). Its own error is ε₃₂·κ-ish: ~1e-6 for
  κ ≲ 1e2, 1e-4 to 1e-2 for κ ≳ 1e4 with a heavy tail (U, V are accurate to ε₃₂·κ only).
- ``"svd-tall"``: the same SVD run on the tall orientation (Mᵀ = V S Uᵀ, the same matrix):
  LAPACK's SVD of a wide matrix is 2-2.5× slower than of its transpose on the CPU.
- ``"gram"``: only the spectrum and the singular vectors of the smaller side are needed.
  With k = min(m, n) and, for a tall M, G = MᵀM = V diag(S²) Vᵀ (k × k):

      SB(M) = U diag(S′) Vᵀ = M · V diag(S′/S) Vᵀ = M · W,   S′/S = max(1, S[idx]/S)

  (wide M: W from G = MMᵀ, SB(M) = W·M). β = 0 gives W = S[0]·G^(−1/2). One float64 k × k
  ``eigh`` and two m × k × k products replace the m × k SVD. The Gram matrix is accumulated
  in float32 when a cheap estimate of what that costs in accuracy (a Cholesky factor of the
  float32 Gram and 16 fixed probe vectors: ε₃₂·rms_j(λ̄/λ_j), :func:`_gram_probe`), times a
  safety factor, stays below :data:`GRAM32_MAX_ERR`, and in float64 otherwise; the product
  M·W runs in float32 when its estimated rounding error (ε₃₂·σ1·‖f‖/‖S∘f‖, f = S′/S) stays
  below :data:`APPLY32_MAX_ERR`. Error ≤ 1e-5 (measured ≤ 6e-6 on every benchmark class).
  Rank-deficient matrices (whose null-space singular vectors the SVD picks arbitrarily, so
  that SB is not unique there) and κ > :data:`MAX_COND` fall back to ``"svd"``.
- ``"polar"``: SB(M) = S_idx·polar(M) + Σ_{i<idx} (S_i − S_idx)·u_i v_iᵀ (β = 0: S₀·polar(M)).
  polar(M) = U Vᵀ by the QDWH iteration (Nakatsukasa, Bai, Gygi 2010; the Cholesky form, at
  most 6 iterations for κ ≤ 1e16) in float64, scaled by σ_max and a lower bound of σ_min that
  a Cholesky factor of the Gram gives; then H = polar(M)ᵀM = V diag(S) Vᵀ, whose trace is
  ΣS, so idx needs only the leading eigenvalues of H (block subspace iteration, the full
  ``eigh`` of H when more than 12 are needed or the iteration stalls). Error ≤ 1e-8
  (float64 throughout). Matrix products and k × k factorizations only: the natural GPU
  route; on the CPU it is several times slower than ``"gram"`` (benchmarks/README.md).
  When polar(M) is ill-defined (rank deficient, κ > :data:`MAX_COND`) or the iteration did
  not reach orthonormality, it falls back to ``"svd"``.
- ``"auto"`` (default): per matrix, the route a measured cost model (:class:`CostModel`,
  :func:`predicted_seconds`) predicts to be fastest for the shape, dtype and device (the CPU
  model was fitted with one thread and serves every thread count so far), among ``"svd"``, ``"svd-tall"``, ``"gram"`` and ``"polar"``. The Gram route's
  cost depends on the conditioning (float32 or float64 Gram and product): where it may win,
  auto first forms the float32 Gram and the probe (which the Gram route then reuses), and
  decides with the precision they call for. On devices without a measured model (GPUs so
  far) auto takes ``"gram"`` for matrices with min(m, n) ≥ 128 and an aspect ratio ≥ 1.5, the
  SVD otherwise.
"""

MAX_COND = 1e6
"""The Gram and polar routes fall back to the SVD when σ_max/σ_min exceeds this (or σ_min = 0):
their float64 Gram matrix resolves σ_min to ε₆₄·κ² relative, 1e-4 at κ = 1e6."""

GRAM32_MAX_ERR = 5e-6
"""Largest estimated error (times :data:`GRAM32_SAFETY`) accepted from a float32 Gram matrix."""
GRAM32_SAFETY = 12.0
"""Largest measured error / estimate ratio (9.4, over geometric, power-law and task-like spectra
with κ = 3, 30, 300 on 1024 × 256, 2048 × 256 and 3072 × 768 matrices) with a margin."""
APPLY32_MAX_ERR = 1e-5
"""Largest estimated rounding error accepted from the product M·W in float32."""

_PROBES = 16  # probe vectors of the float32-Gram error estimate


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work of the kernels the routes use, on one device and thread count.

    Work units: ``svd_*`` per m·k² and per k³ (thin float32 SVD of an m × k matrix, m ≥ k;
    float64 costs ``f64`` times as much), ``svd_wide`` the factor LAPACK's SVD of the wide
    orientation costs more, ``gemm32`` / ``gemm64`` per multiply-add, ``eigh64`` and ``chol64``
    (Cholesky factor plus inverse) per k³, ``*_call`` each route's fixed cost (its time on a
    64 × 64 matrix: kernel launches and Python). Fitted by
    ``benchmarks/run.py --sections calibrate`` (see benchmarks/README.md)."""

    svd_mk2: float
    svd_k3: float
    svd_wide: float
    gemm32: float
    gemm64: float
    eigh64: float
    chol64: float
    f64: float = 2.0
    svd_call: float = 0.0
    gram_call: float = 0.0
    polar_call: float = 0.0

    def svd(self, m: int, n: int, dtype: torch.dtype, tall: bool) -> float:
        big, k = max(m, n), min(m, n)
        t = self.svd_mk2 * big * k * k + self.svd_k3 * k ** 3
        t *= self.f64 if dtype == torch.float64 else 1.0
        return self.svd_call + t * (self.svd_wide if (m < n and not tall) else 1.0)

    def gram(self, m: int, n: int, gram64: bool, apply64: bool, probe: bool = True) -> float:
        big, k = max(m, n), min(m, n)
        sym = _gram_share(k)
        t = self.gram_call + self.eigh64 * k ** 3 + self.gemm64 * sym * k ** 3  # eigh, W = A·Aᵀ
        t += (self.gemm64 if gram64 else self.gemm32) * sym * big * k * k
        t += (self.gemm64 if apply64 else self.gemm32) * big * k * k
        if probe:  # float32 Gram and its Cholesky probe
            t += (self.gemm32 * sym * big * k * k if gram64 else 0.0) + self.chol64 * k ** 3 / 3
        return t

    def polar(self, m: int, n: int, iterations: int = 5) -> float:
        big, k = max(m, n), min(m, n)
        sym = _gram_share(k)
        per_it = self.chol64 * k ** 3 + self.gemm64 * (sym + 1) * big * k * k
        return self.polar_call + iterations * per_it + self.gemm64 * (sym + 1) * big * k * k + self.chol64 * k ** 3


COST_MODELS: dict[str, CostModel] = {
    # ``benchmarks/run.py --sections calibrate --threads 1`` on the 2-core development machine
    # (Xeon, OpenBLAS/LAPACK, torch 2.14), medians of 3 in CPU seconds (the machine was shared,
    # load 15: CPU time is what stays comparable). A multi-threaded calibration was not possible
    # there (multi-threaded LAPACK calls stall behind other jobs), so every thread count uses it:
    # the decisions depend only on the ratios of the constants.
    "cpu": CostModel(svd_mk2=1.6e-10, svd_k3=1.0e-10, svd_wide=3.0, gemm32=1.6e-11, gemm64=3.2e-11,
                     eigh64=2.1e-10, chol64=4.8e-11, f64=1.9, svd_call=6.1e-4, gram_call=1.3e-3,
                     polar_call=9.7e-3),
}


def cost_model(device: torch.device | str, threads: int | None = None) -> CostModel | None:
    """The measured :class:`CostModel` for ``device`` and ``threads`` (default: torch's current
    thread count), or ``None`` where none was measured (GPUs so far)."""
    device = torch.device(device)
    threads = torch.get_num_threads() if threads is None else int(threads)
    return COST_MODELS.get(device.type) if threads >= 1 else None


def predicted_seconds(shape: tuple[int, int], dtype: torch.dtype, model: CostModel,
                      gram64: bool | None = None, apply64: bool | None = None) -> dict[str, float]:
    """Predicted seconds of each route for one matrix. ``gram64`` / ``apply64``: the Gram
    route's precisions, ``None`` before they are known (the float32 optimum, probe included;
    float64 inputs are float64 throughout). Once they are known the probe has run, and the
    Gram route's prediction is what is left of it (the probe's cost is spent either way)."""
    m, n = shape
    f64 = dtype == torch.float64
    g64 = f64 or bool(gram64)
    a64 = f64 or bool(apply64)
    return {
        "svd": model.svd(m, n, dtype, tall=False),
        "svd-tall": model.svd(m, n, dtype, tall=True),
        "gram": model.gram(m, n, g64, a64, probe=not f64 and gram64 is None),
        "polar": model.polar(m, n),
    }


AUTO_MARGIN = 1.15
"""A route other than the SVD is taken only when predicted at least this factor faster: on
small matrices the cost model's error exceeds the predicted gaps (the ci zoo's 128-wide
matrices, predicted 2 % faster through the Gram route, measured 0.80-0.83× the speed of
``svd-tall``); at ViT-B/32 shapes the Gram route is predicted 1.75-2.1× faster."""


def choose_route(shape: tuple[int, int], dtype: torch.dtype, model: CostModel | None,
                 gram64: bool | None = None, apply64: bool | None = None) -> str:
    """The route ``"auto"`` takes for one matrix: the fastest by :func:`predicted_seconds`
    (ties go to the reference; a non-SVD route must win by :data:`AUTO_MARGIN`); without a model, ``"gram"`` for aspect ratios ≥ 1.5 and
    min(m, n) ≥ 128, ``"svd"`` otherwise."""
    if model is None:
        k, big = min(shape), max(shape)
        return "gram" if k >= 128 and big >= 1.5 * k else "svd"
    t = predicted_seconds(shape, dtype, model, gram64, apply64)
    best = min(t, key=lambda r: (t[r], list(t).index(r)))
    svd_best = min(("svd", "svd-tall"), key=lambda r: (t[r], r != "svd"))
    if best not in ("svd", "svd-tall") and t[best] * AUTO_MARGIN > t[svd_best]:
        return svd_best  # within the model's error of the SVD: take the SVD
    return best


def _gram_share(k: int) -> float:
    """Share of a full product that :func:`_gram`'s block-symmetric Gram computes."""
    blocks = 4 if k >= 512 else 2 if k >= 256 else 1
    return (blocks + 1) / (2 * blocks)


def _check_route(route: str) -> str:
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}; got '{route}'")
    return route


def _check_matrix(matrix: Tensor, name: str) -> None:
    if matrix.ndim != 2:
        raise ValueError(f"{name}: Subspace Boosting needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise ValueError(f"{name}: Subspace Boosting needs a floating-point matrix, got {matrix.dtype}")
    if not all_finite(matrix):
        raise ValueError(f"{name}: matrix contains NaN or Inf values")


def _svd_boost(work: Tensor, beta: float, tall: bool = False) -> tuple[Tensor, int]:
    """Alg. 1 by SVD on ``work`` (already in the compute dtype); ``tall`` runs it on the tall
    orientation. Returns the boosted matrix (compute dtype) and the cutoff index."""
    flip = tall and work.shape[0] < work.shape[1]
    a = work.T if flip else work
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    idx = boost_cutoff_index(s, beta)
    s_new = torch.clamp(s, min=s[idx])
    out = (u * s_new.unsqueeze(0)) @ vh
    return (out.T if flip else out), idx


def _gram(stack: Tensor, tall: bool, dtype: torch.dtype) -> Tensor:
    """Batched Gram matrices of the smaller side, XᵀX (tall) or XXᵀ (wide), in ``dtype``.

    Symmetry halves the work: the k columns are split into up to 4 blocks and only the block
    rows of the upper triangle are multiplied (one product per block row, e.g. 10 of 16 block
    products for k ≥ 512), the lower triangle is mirrored."""
    x = stack.to(dtype)
    if not tall:
        x = x.mT
    k = x.shape[-1]
    blocks = 4 if k >= 512 else 2 if k >= 256 else 1
    if blocks == 1:
        return x.mT @ x
    edges = [round(i * k / blocks) for i in range(blocks + 1)]
    out = torch.empty(*x.shape[:-2], k, k, dtype=dtype, device=x.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        row = x[..., lo:hi].mT @ x[..., lo:]
        out[..., lo:hi, lo:] = row
        out[..., lo:, lo:hi] = row.mT
    return out


@dataclass
class _Probe:
    """A float32 Gram matrix and what it says about the precision the Gram route needs."""

    gram: Tensor  # float32, k × k
    gram64: bool  # the float32 Gram is not accurate enough: accumulate it in float64
    apply64: bool  # predicted: the product M·W needs float64
    gram32_error: float = math.inf  # the estimate behind ``gram64`` (inf: Cholesky failed)
    apply32_error: float = math.inf  # the estimate behind ``apply64``


def _gram_probe(work: Tensor) -> _Probe:
    """Float32 Gram matrix of ``work`` (float32) and an estimate of the error it would cause,
    ε₃₂·rms_j(λ̄/λ_j)·√max(1, length/3072), λ̄ = tr(G)/k (rounding perturbs G by about ε₃₂·λ̄,
    growing like √length with the accumulation; direction j feels it relative to λ_j).
    rms_j(1/λ_j)² = tr(G⁻²)/k comes from a float64 Cholesky factor of G and 16 fixed ±1 probe
    vectors z (E‖G⁻¹z‖² = tr(G⁻²)); a failed Cholesky factorization means float64. The same
    factor predicts the product's error for β = 0 (an upper bound for β > 0):
    ε₃₂·σ1·√(tr(G⁻¹)/k), with σ1² ≥ the largest Rayleigh quotient of the probes after one
    multiplication by G."""
    m, n = work.shape
    tall = m >= n
    g32 = _gram(work.unsqueeze(0), tall, torch.float32)[0]
    k = g32.shape[0]
    g = g32.to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return _Probe(g32, True, True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = (torch.randint(0, 2, (k, _PROBES), generator=gen, dtype=torch.float64) * 2 - 1).to(g.device)
    sol = torch.cholesky_solve(z, chol)
    tr_inv2 = float((sol * sol).sum()) / _PROBES
    tr_inv = float((z * sol).sum()) / _PROBES
    eps = torch.finfo(torch.float32).eps
    lam_bar = float(g.diagonal().sum()) / k
    err = eps * lam_bar * math.sqrt(max(tr_inv2, 0.0) / k) * math.sqrt(max(1.0, max(m, n) / 3072))
    gz = g @ z
    lam_max = float(((gz * gz).sum(0) / (z * gz).sum(0).clamp(min=1e-300)).max())
    apply_err = eps * math.sqrt(max(lam_max, 0.0)) * math.sqrt(max(tr_inv, 0.0) / k)
    return _Probe(g32, GRAM32_SAFETY * err > GRAM32_MAX_ERR, apply_err > APPLY32_MAX_ERR, err, apply_err)


def _gram_boost(work: Tensor, beta: float, probe: _Probe | None = None,
                apply64: bool | None = None) -> tuple[Tensor, int, bool, bool] | None:
    """Gram route for one matrix (compute dtype). Returns (boosted matrix, cutoff index, float64
    Gram used, float64 product used), or ``None`` where the matrix is rank-deficient or too
    ill-conditioned (the caller falls back to the reference SVD).

    The final product with W runs in the work dtype when its estimated rounding error,
    ε·σ1·‖f‖/‖S∘f‖ with f = S′/S (the error of M·v_j is ≈ ε·σ1, amplified by f_j, against an
    output of size S′_j), stays below :data:`APPLY32_MAX_ERR`; otherwise in float64 (``apply64``
    overrides the decision)."""
    m, n = work.shape
    tall = m >= n
    if work.dtype == torch.float64:
        g, gram64 = _gram(work.unsqueeze(0), tall, torch.float64)[0], True
    else:
        probe = probe if probe is not None else _gram_probe(work)
        gram64 = probe.gram64
        g = _gram(work.unsqueeze(0), tall, torch.float64)[0] if gram64 else probe.gram.to(torch.float64)
    lam, vec = torch.linalg.eigh(g)  # ascending; the spectrum S is read descending
    s = lam.clamp(min=0.0).sqrt()
    smax, smin = float(s[-1]), float(s[0])
    if not (smax > 0.0 and smin > 0.0 and smax <= MAX_COND * smin):
        return None
    desc = s.flip(0)
    idx = boost_cutoff_index(desc, beta)
    f = torch.clamp(desc[idx] / s, min=1.0)
    eps = torch.finfo(work.dtype).eps
    if apply64 is None:
        apply64 = eps * smax * float(f.norm() / (s * f).norm()) > APPLY32_MAX_ERR
    apply64 = apply64 or work.dtype == torch.float64
    # W = V diag(f) Vᵀ = A Aᵀ with A = V diag(√f) (f ≥ 1): a Gram product, symmetric
    a = vec * f.sqrt().unsqueeze(0)
    if apply64:
        x, w = work.to(torch.float64), _gram(a.unsqueeze(0), False, torch.float64)[0]
    else:
        x, w = work, _gram(a.unsqueeze(0), False, work.dtype)[0]
    out = x @ w if tall else w @ x
    return out.to(work.dtype), idx, gram64, apply64


def _qdwh_weights(l: float) -> tuple[float, float, float]:
    """Dynamically weighted Halley parameters (a, b, c) of QDWH for a lower bound l of σ_min."""
    l2 = l * l
    d = (4.0 * (1.0 - l2) / (l2 * l2)) ** (1.0 / 3.0)
    a = math.sqrt(1.0 + d) + 0.5 * math.sqrt(max(8.0 - 4.0 * d + 8.0 * (2.0 - l2) / (l2 * math.sqrt(1.0 + d)), 0.0))
    b = (a - 1.0) ** 2 / 4.0
    return a, b, a + b - 1.0


def _extreme_eigenvalue(apply, k: int, device: torch.device, steps: int = 30) -> float:
    """Largest eigenvalue of a symmetric positive definite operator by block power iteration
    with Rayleigh–Ritz (4 fixed start vectors); a lower bound, close after a few steps."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    y = torch.randn(k, 4, generator=gen, dtype=torch.float64).to(device)
    top = 0.0
    for _ in range(steps):
        q = torch.linalg.qr(y)[0]
        y = apply(q)
        ritz = torch.linalg.eigvalsh((q.T @ y + y.T @ q) / 2)
        new = float(ritz[-1])
        if abs(new - top) <= 1e-6 * abs(new):
            return new
        top = new
    return top


def _top_eigen(h: Tensor, beta: float, total: float, block: int = 16, steps: int = 60) -> tuple[Tensor, Tensor, int] | None:
    """Leading eigenpairs of the symmetric PSD matrix ``h`` (the singular values S, descending,
    and V) by block subspace iteration, enough to find Alg. 1's idx for ``beta`` given
    ``total`` = ΣS. Returns (S[:idx+1], V[:, :idx+1], idx) or ``None`` when more than
    ``block`` − 4 values would be needed or the iteration did not converge."""
    k = h.shape[0]
    if block + 4 > k:
        return None
    gen = torch.Generator(device="cpu").manual_seed(2)
    q = torch.linalg.qr(torch.randn(k, block, generator=gen, dtype=h.dtype).to(h.device))[0]
    prev = None
    for _ in range(steps):
        q = torch.linalg.qr(h @ q)[0]
        ritz, vec = torch.linalg.eigh(q.T @ h @ q)
        vals, q = ritz.flip(0), q @ vec.flip(1)
        if prev is not None and float((vals[:block - 4] - prev[:block - 4]).abs().max()) <= 1e-13 * float(vals[0]):
            if beta == 0.0:
                idx = 0
            else:
                ratio = torch.cumsum(vals[:block - 4], 0) / total
                hits = torch.nonzero(ratio >= beta - 8 * torch.finfo(torch.float32).eps)
                if not hits.numel():
                    return None
                idx = int(hits[0])
            resid = h @ q[:, :idx + 1] - q[:, :idx + 1] * vals[:idx + 1]
            if float(resid.norm()) <= 1e-10 * float(vals[0]):
                return vals[:idx + 1], q[:, :idx + 1], idx
        prev = vals
    return None


def _polar_boost(work: Tensor, beta: float) -> tuple[Tensor, int] | None:
    """Polar route for one matrix (any float dtype; computed in float64 on the tall
    orientation). Returns (boosted matrix in the work dtype, cutoff index) or ``None`` where
    polar(M) is ill-defined (rank deficient, κ > :data:`MAX_COND`) or QDWH did not converge."""
    flip = work.shape[0] < work.shape[1]
    a = (work.T if flip else work).to(torch.float64)
    k = a.shape[1]
    eye = torch.eye(k, dtype=torch.float64, device=a.device)
    g = _gram(a.unsqueeze(0), True, torch.float64)[0]
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None
    lam_max = _extreme_eigenvalue(lambda y: g @ y, k, a.device)
    inv_max = _extreme_eigenvalue(lambda y: torch.cholesky_solve(y, chol), k, a.device)
    if not (lam_max > 0.0 and inv_max > 0.0) or lam_max * inv_max > MAX_COND ** 2:
        return None
    alpha = math.sqrt(lam_max) * 1.01  # ≥ σ_max (the power iteration approaches it from below)
    l = min(1.0 / (math.sqrt(inv_max) * alpha) / 1.1, 0.99)  # ≤ σ_min / alpha
    x, gx = a / alpha, g / alpha ** 2
    for _ in range(12):
        wa, wb, wc = _qdwh_weights(l)
        zc, info = torch.linalg.cholesky_ex(eye + wc * gx)
        if int(info) != 0:
            return None
        x = (wb / wc) * x + (wa - wb / wc) * (x @ torch.cholesky_inverse(zc))
        l = min(l * (wa + wb * l * l) / (1.0 + wc * l * l), 1.0)
        gx = _gram(x.unsqueeze(0), True, torch.float64)[0]
        if 1.0 - l <= 1e-15:
            break
    if float((gx - eye).abs().max()) > 1e-10:
        return None
    h = x.T @ a
    h = (h + h.T) / 2
    total = float(h.diagonal().sum())
    if not total > 0.0:
        return None
    top = _top_eigen(h, beta, total)
    if top is None:  # the full spectrum of H
        lam, vec = torch.linalg.eigh(h)
        s, v = lam.flip(0).clamp(min=0.0), vec.flip(1)
        idx = boost_cutoff_index(s, beta)
        s, v = s[:idx + 1], v[:, :idx + 1]
    else:
        s, v, idx = top
    out = s[idx] * x
    if idx > 0:
        out = out + ((x @ v[:, :idx]) * (s[:idx] - s[idx])) @ v[:, :idx].T
    return (out.T if flip else out).to(work.dtype), idx


def boost_matrices(
    matrices: Sequence[Tensor],
    betas: float | Sequence[float] = 0.0,
    *,
    route: str = "auto",
    names: Sequence[str] | None = None,
) -> list[tuple[Tensor, int | None, str]]:
    """Subspace Boosting of several matrices, one at a time.

    Returns, per matrix, ``(boosted matrix in the input dtype, cutoff index, route used)``;
    an all-zero matrix comes back unchanged with index ``None`` and route ``"zero"``; where a
    fast route fell back, the route reads ``"svd"``. ``betas`` is one β or one per matrix.
    See :data:`ROUTES` for the routes; ``"auto"`` reads torch's thread count once per call.
    """
    _check_route(route)
    mats = list(matrices)
    names = list(names) if names is not None else [f"matrix {i}" for i in range(len(mats))]
    if isinstance(betas, (int, float)):
        beta_list = [_check_beta(betas)] * len(mats)
    else:
        beta_list = [_check_beta(b) for b in betas]
        if len(beta_list) != len(mats):
            raise ValueError(f"betas: got {len(beta_list)} values for {len(mats)} matrices")
    threads = torch.get_num_threads()
    decided: dict[tuple, tuple[str, CostModel | None]] = {}  # first-phase choice per shape, dtype, device
    results: list[tuple[Tensor, int | None, str]] = []
    for m, name, beta in zip(mats, names, beta_list):
        if m.ndim != 2 or not m.is_floating_point():
            _check_matrix(m, name)
        peak = float(m.detach().abs().amax()) if m.numel() else 0.0  # one pass: NaN/Inf and zero
        if not math.isfinite(peak):
            raise ValueError(f"{name}: matrix contains NaN or Inf values")
        if peak == 0.0:
            results.append((m.clone(), None, "zero"))
            continue
        work = m.detach().to(_compute_dtype(m.dtype))
        r, probe = route, None
        if r == "auto":
            key = (tuple(m.shape), work.dtype, m.device)
            if key not in decided:
                model = cost_model(m.device, threads)
                decided[key] = (choose_route(key[0], work.dtype, model), model)
            r, model = decided[key]
            if r == "gram" and model is not None and work.dtype != torch.float64:
                probe = _gram_probe(work)  # the Gram route reuses its float32 Gram
                r = choose_route(tuple(m.shape), work.dtype, model, probe.gram64, probe.apply64)
        got: tuple | None = None
        if r == "gram":
            got = _gram_boost(work, beta, probe)
        elif r == "polar":
            got = _polar_boost(work, beta)
        if r in ("gram", "polar") and got is None:  # rank-deficient or too ill-conditioned
            r = "svd"
        if got is None:
            got = _svd_boost(work, beta, tall=(r == "svd-tall"))
        results.append((got[0].to(m.dtype), got[1], r))
    return results


def subspace_boost(matrix: Tensor, beta: float = 0.0, *, name: str = "matrix", route: str = "auto") -> Tensor:
    """Subspace Boosting of one 2-D matrix, paper Alg. 1.

    The decomposition runs in float32 at least (float64 inputs stay float64); the result
    comes back in the input's dtype and device. An all-zero matrix comes back unchanged (a
    copy): its normalised cumulative sum would be 0/0. ``route`` picks how it is computed
    (:data:`ROUTES`; ``"svd"`` is Alg. 1 verbatim, ``"auto"`` is the exact fast route).

    Raises ``ValueError`` (naming ``name``) for a non-2-D input, NaN/Inf entries or β ∉ [0, 1].
    """
    _check_beta(beta)
    _check_route(route)
    return boost_matrices([matrix], beta, route=route, names=[name])[0][0]


ATTENTION_TREATMENTS = ("fused", "qkv", "heads")
"""How Subspace Boosting treats the query/key/value projections (:func:`attention_blocks`)."""

_QKV_SUBLAYERS = {
    "attn.in_proj": "fused",  # open_clip / OpenAI CLIP: [W_Q; W_K; W_V], (3d × d)
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",  # BERT
    "SelfAttention.q": "q", "SelfAttention.k": "k", "SelfAttention.v": "v",  # T5
    "EncDecAttention.q": "q", "EncDecAttention.k": "k", "EncDecAttention.v": "v",
}


def _check_attention(attention: str, num_heads: int | None) -> None:
    if attention not in ATTENTION_TREATMENTS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_TREATMENTS)}; got '{attention}'")
    if attention == "heads":
        if num_heads is None:
            raise ValueError("attention='heads' needs num_heads (the number of attention heads cannot be read "
                             "from a state dict: pass it, or infer it from the model with infer_num_heads)")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")


def attention_blocks(
    key: str, shape: Sequence[int], attention: str = "fused", num_heads: int | None = None
) -> list[tuple[str, int, int]] | None:
    """Row blocks ``(label, start, stop)`` in which the matrix ``key`` is boosted, or ``None``
    to boost it whole.

    Only query/key/value projections are split (CLIP's fused ``attn.in_proj_weight``, BERT's
    ``query/key/value``, T5's ``q/k/v``); every other matrix, ``out_proj`` included, is boosted
    whole. ``attention``:

    - ``"fused"``: the fused (3d × d) in_proj is one matrix (separate q/k/v stay separate);
    - ``"qkv"``: the fused in_proj is cut into its Q, K and V row blocks (d × d each), boosted
      separately;
    - ``"heads"``: additionally each of Q, K, V is cut into ``num_heads`` row blocks of
      d/num_heads rows, one per attention head (the rows of head h of an open_clip /
      ``nn.MultiheadAttention`` projection are h·d_h .. (h+1)·d_h − 1).

    Raises ``ValueError`` naming the key when the rows do not split evenly."""
    _check_attention(attention, num_heads)
    info = parse_block_key(key)
    kind = _QKV_SUBLAYERS.get(info.sublayer) if info is not None else None
    if kind is None or attention == "fused" or len(shape) != 2:
        return None
    rows = int(shape[0])
    if kind == "fused":
        if rows % 3:
            raise ValueError(f"{key}: a fused in_proj needs a row count divisible by 3, got shape {tuple(shape)}")
        d = rows // 3
        parts = [("q", 0, d), ("k", d, 2 * d), ("v", 2 * d, 3 * d)]
    else:
        parts = [(kind, 0, rows)]
    if attention == "qkv":
        return parts if len(parts) > 1 else None
    assert num_heads is not None
    out = []
    for label, lo, hi in parts:
        if (hi - lo) % num_heads:
            raise ValueError(f"{key}: {hi - lo} rows per projection do not split into num_heads={num_heads} heads")
        dh = (hi - lo) // num_heads
        out.extend((f"{label}.h{h}", lo + h * dh, lo + (h + 1) * dh) for h in range(num_heads))
    return out


def infer_num_heads(source: object) -> int:
    """Number of attention heads of a model, for ``attention="heads"``.

    ``source``: a ``torch.nn.Module`` (the ``num_heads`` of its ``nn.MultiheadAttention``
    modules, which must all agree), an open_clip model config dict (its ``vision_cfg``:
    ``width // head_width``, head_width 64 by default, as open_clip builds the image tower),
    or the name of an open_clip model config (e.g. ``"ViT-B-32"``: 768 // 64 = 12 heads).
    Raises ``ValueError`` when it cannot be inferred."""
    if isinstance(source, torch.nn.Module):
        found = {int(m.num_heads) for m in source.modules() if isinstance(m, torch.nn.MultiheadAttention)}
        if len(found) != 1:
            raise ValueError(f"cannot infer num_heads: the module has attention layers with {sorted(found) or 'no'} heads")
        return found.pop()
    config = source
    if isinstance(source, str):
        try:
            import open_clip
        except ImportError:  # pragma: no cover - open_clip is a dependency of the zoo
            raise ValueError(f"cannot infer num_heads of '{source}': open_clip is not installed") from None
        config = open_clip.get_model_config(source)
        if config is None:
            raise ValueError(f"cannot infer num_heads: open_clip knows no model config '{source}'; pass num_heads")
    if isinstance(config, Mapping):
        vision = config.get("vision_cfg", config)
        if isinstance(vision, Mapping) and "width" in vision:
            width, head_width = int(vision["width"]), int(vision.get("head_width", 64))
            if width % head_width == 0:
                return width // head_width
    raise ValueError(f"cannot infer num_heads from {type(source).__name__}; pass num_heads")


def boost_task_vector(
    task_vector: Mapping[str, Tensor],
    beta: float = 0.0,
    *,
    beta_attn: float | None = None,
    beta_mlp: float | None = None,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
    route: str = "auto",
    attention: str = "fused",
    num_heads: int | None = None,
) -> StateDict:
    """Boost every block matrix of a merged task vector; every other tensor is returned as is.

    ``layer_types`` restricts boosting to attention and/or MLP matrices (paper Table 3b);
    ``beta_attn`` / ``beta_mlp`` override β per layer type (Table 3c, Table 8).
    All-zero matrices (e.g. the frozen text tower of CLIP) are skipped. ``route``: see
    :data:`ROUTES`.

    ``attention`` (:func:`attention_blocks`) says how the query/key/value projections are
    boosted: ``"fused"`` (default) boosts CLIP's (3d × d) ``in_proj`` as one matrix, ``"qkv"``
    boosts its Q, K and V blocks separately, ``"heads"`` each head's rows of Q, K and V
    separately (needs ``num_heads``; :func:`infer_num_heads` reads it from a model or an
    open_clip config). The paper does not say which one it used: FusionBench's SB helper
    boosts Q, K and V separately by default, and the authors' helper code offered whole-matrix,
    per-Q/K/V and per-head options. The default stays ``"fused"`` (boosting the parameter as
    it is stored, the reading of Alg. 1 that needs no architecture knowledge); chapter 3
    compares the three on the mini zoo.
    """
    out, _ = boost_task_vector_with_report(
        task_vector, beta, beta_attn=beta_attn, beta_mlp=beta_mlp,
        layer_types=layer_types, include_proj=include_proj, route=route,
        attention=attention, num_heads=num_heads,
    )
    return out


def boost_task_vector_with_report(
    task_vector: Mapping[str, Tensor],
    beta: float = 0.0,
    *,
    beta_attn: float | None = None,
    beta_mlp: float | None = None,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
    route: str = "auto",
    attention: str = "fused",
    num_heads: int | None = None,
) -> tuple[StateDict, pd.DataFrame]:
    """:func:`boost_task_vector` plus a table with one row per boosted matrix (per block
    where ``attention`` splits a projection: column ``part``, e.g. ``"q"`` or ``"k.h3"``,
    empty for a whole matrix): key, β used, cutoff index, rank, whether it was skipped as
    all-zero, and the route that computed it."""
    betas = {
        "attn": _check_beta(beta if beta_attn is None else beta_attn, "beta_attn"),
        "mlp": _check_beta(beta if beta_mlp is None else beta_mlp, "beta_mlp"),
        "proj": _check_beta(beta, "beta"),
    }
    _check_route(route)
    _check_attention(attention, num_heads)
    keys = set(select_block_keys(task_vector, layer_types, include_proj))
    todo: list[tuple[str, str, tuple[int, int] | None]] = []  # (key, part label, rows)
    ltypes: dict[str, str] = {}
    for key, value in task_vector.items():
        if key not in keys:
            continue
        info = parse_block_key(key)
        ltypes[key] = info.layer_type if info is not None else "proj"
        blocks = attention_blocks(key, tuple(value.shape), attention, num_heads)
        if blocks is None:
            todo.append((key, "", None))  # boost_matrices raises, naming the key, for NaN / Inf values
        else:
            todo.extend((key, label, (lo, hi)) for label, lo, hi in blocks)
    mats = [task_vector[k] if rows is None else task_vector[k][rows[0]:rows[1]] for k, _, rows in todo]
    names = [k if not label else f"{k} [{label}]" for k, label, _ in todo]
    boosted = boost_matrices(mats, [betas[ltypes[k]] for k, _, _ in todo], route=route, names=names)
    parts: dict[str, list[tuple[str, Tensor, int | None, str]]] = {}
    for (key, label, _), (new, idx, used) in zip(todo, boosted):
        parts.setdefault(key, []).append((label, new, idx, used))
    out: StateDict = {}
    rows = []
    for key, value in task_vector.items():
        if key not in parts:
            out[key] = value
            continue
        pieces = parts[key]
        if all(used == "zero" for _, _, _, used in pieces):
            out[key] = value
        elif len(pieces) == 1:
            out[key] = pieces[0][1]
        else:
            out[key] = torch.cat([new for _, new, _, _ in pieces], 0)
        for label, new, idx, used in pieces:
            rows.append(dict(key=key, layer_type=ltypes[key], beta=betas[ltypes[key]], cutoff_index=idx,
                             rank=min(new.shape), skipped_zero=used == "zero", route=used, part=label))
    return out, pd.DataFrame(
        rows, columns=["key", "layer_type", "beta", "cutoff_index", "rank", "skipped_zero", "route", "part"]
    )
