"""The paper's claims as data: each claim once, with the rule that judges it from our measurements.

A :class:`Claim` names what the paper states, where (section, table, figure), the paper's
number(s) (formatted from :mod:`subboost.paper`, never typed here), the chapter and section of
the book that holds the evidence, and a *verdict rule*: a pure function from measured numbers
to a :class:`Verdict`, one of :data:`VERDICTS` with a one-line reason. The thresholds of every
rule are module constants, and each claim states them in words (``rule_text``), so the book
can print them beside the verdicts.

Chapters call the rules on their measurements and store the verdicts with
:func:`write_record` (``claims.json`` beside their figures); :func:`findings_rows` collects
every chapter's record for the "Findings at a glance" page, showing :data:`NOT_RUN` for
claims whose chapter left no record.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from subboost import paper

REPRODUCED = "reproduced"
PARTLY = "partly"
NOT_REPRODUCED = "not reproduced"
NOT_TESTABLE = "not testable here"
#: The verdicts a rule can return.
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE)
#: Shown for a claim whose chapter did not run (no record).
NOT_RUN = "not run"
RECORD_NAME = "claims.json"

# ----------------------------------------------------------------------------- thresholds

#: Rank collapse: share of block matrices whose stable rank must fall from the smallest to
#: the largest N ("across a majority of layers").
RANK_FALLING_SHARE = 0.5
#: Rank vs accuracy: Pearson r across N for "strong" (reproduced) and "some" (partly) correlation.
STRONG_CORRELATION = 0.7
WEAK_CORRELATION = 0.3
#: Rank vs accuracy needs at least this many task counts.
MIN_CORRELATION_POINTS = 3
#: SB's mean accuracy gain over TA / TIES / Consensus that counts as a large margin [points].
LARGE_GAIN = 3.0
#: β robustness: largest accuracy spread over the β values at one N [points].
BETA_SPREAD = 2.0
#: β = 0 counts as best when it is within this many points of the best β at every N.
BETA0_TOLERANCE = 0.5
#: TA+LiNeS+SB "matches" the state of the art when at most this many points below its best.
MATCH_TOLERANCE = 1.0
#: "A fraction of their merge time": the other methods take at least this many times SB's time.
MIN_SPEEDUP = 2.0
#: Predicted exponents (Props. 1, 3) hold when the fitted log-log slope is within this distance.
SLOPE_TOLERANCE = 0.05
#: Prop. 3: relative change of the ratio between α values that counts as "independent of α".
ALPHA_INDEPENDENCE = 1e-6
#: Prop. 4: share of cases where the sign of the gain must agree with Eq. 29 for "partly".
PROP4_PARTLY = 0.9
#: Supp. E.4: the best collapse exponent must lie within this distance of the predicted one.
GAMMA_TOLERANCE = 0.1
#: Selection beats random "beyond noise" when the difference exceeds this many standard
#: errors of the random mean.
NOISE_STDERRS = 2.0
#: Higher-Order SB is "competitive" within this many points of the best SB row.
COMPETITIVE_GAP = 2.0


# ----------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Verdict:
    """A rule's outcome: ``verdict`` (one of :data:`VERDICTS`), a one-line ``reason`` and
    ``ours``, our measured number(s) as shown in the findings table."""

    verdict: str
    reason: str
    ours: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r}")


@dataclass(frozen=True)
class Claim:
    """One claim of the paper. ``chapter`` and ``section`` (a MyST label in that chapter) point
    to the evidence; ``paper`` is the paper's number(s); ``rule_text`` states the thresholds."""

    id: str
    statement: str
    where: str
    chapter: str
    section: str
    paper: str
    rule_text: str
    rule: Callable[..., Verdict]

    def judge(self, **measurements: Any) -> Verdict:
        """Apply the rule to the measurements (keyword arguments of the rule)."""
        return self.rule(**measurements)


def _v(verdict: str, reason: str, ours: str = "") -> Verdict:
    return Verdict(verdict, reason, ours)


def _ordered(values: Mapping[Any, float]) -> list[tuple[Any, float]]:
    return sorted((k, float(v)) for k, v in values.items())


def _finite(*xs: float) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(float(x)) for x in xs)


# ----------------------------------------------------------------------------- rules


def rank_collapse(mean_stable_rank: Mapping[int, float], share_falling: float) -> Verdict:
    """Fig. 2, 3, 7: the mean stable rank of the merged block matrices falls as N grows.

    Reproduced: the mean never rises with N, is lower at the largest N than at the smallest,
    and the stable rank falls for at least :data:`RANK_FALLING_SHARE` of the matrices;
    partly: lower at the largest N only; not reproduced otherwise."""
    items = _ordered(mean_stable_rank)
    if len(items) < 2:
        return _v(NOT_TESTABLE, "needs at least two task counts")
    (n0, v0), (n1, v1) = items[0], items[-1]
    ours = f"mean srank {v0:.3g} → {v1:.3g} (N = {n0} → {n1}); falls for {share_falling:.0%} of matrices"
    monotone = all(b <= a for (_, a), (_, b) in zip(items, items[1:]))
    if v1 < v0 and monotone and share_falling >= RANK_FALLING_SHARE:
        return _v(REPRODUCED, "the mean stable rank falls at every step and for most matrices", ours)
    if v1 < v0:
        return _v(PARTLY, "lower at the largest N, but not at every step or not for most matrices", ours)
    return _v(NOT_REPRODUCED, "the mean stable rank does not fall with N", ours)


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def rank_accuracy(stable_rank: Sequence[float], normalized_accuracy: Sequence[float]) -> Verdict:
    """Fig. 2d: falling stable rank goes with falling accuracy (Task Arithmetic across N).

    Pearson r ≥ :data:`STRONG_CORRELATION`: reproduced; ≥ :data:`WEAK_CORRELATION`: partly;
    lower: not reproduced; fewer than :data:`MIN_CORRELATION_POINTS` points or a constant
    series: not testable."""
    x, y = [float(v) for v in stable_rank], [float(v) for v in normalized_accuracy]
    if len(x) != len(y):
        raise ValueError(f"stable_rank and normalized_accuracy differ in length ({len(x)} vs {len(y)})")
    if len(x) < MIN_CORRELATION_POINTS:
        return _v(NOT_TESTABLE, f"needs at least {MIN_CORRELATION_POINTS} task counts, this run has {len(x)}")
    r = _pearson(x, y)
    if not math.isfinite(r):
        return _v(NOT_TESTABLE, "stable rank or accuracy is constant across N", f"{len(x)} points")
    ours = f"Pearson r = {r:+.2f} over {len(x)} task counts"
    if r >= STRONG_CORRELATION:
        return _v(REPRODUCED, "rank and accuracy fall together (strong correlation)", ours)
    if r >= WEAK_CORRELATION:
        return _v(PARTLY, "rank and accuracy move together, but only moderately", ours)
    return _v(NOT_REPRODUCED, "no positive correlation between rank and accuracy", ours)


def sb_raises_rank(ranks: Mapping[str, tuple[float, float]]) -> Verdict:
    """Fig. 1a, 6: SB raises the stable rank of merged matrices. ``ranks``: method → (mean
    stable rank without SB, with SB). Reproduced: raised for every method; partly: for some."""
    if not ranks:
        return _v(NOT_TESTABLE, "no method was compared")
    raised = [m for m, (a, b) in ranks.items() if b > a]
    ours = "; ".join(f"{m} {a:.2g} → {b:.2g}" for m, (a, b) in ranks.items())
    if len(raised) == len(ranks):
        return _v(REPRODUCED, "SB raises the stable rank of every method", ours)
    if raised:
        return _v(PARTLY, f"SB raises the stable rank of {len(raised)} of {len(ranks)} methods", ours)
    return _v(NOT_REPRODUCED, "SB raises the stable rank of no method", ours)


def sb_improves_merging(gains: Mapping[str, Mapping[int, float]]) -> Verdict:
    """Table 1: SB improves TA, TIES and Consensus by large margins. ``gains``: method → N →
    accuracy of method+SB minus method [points]. Reproduced: every gain > 0 and their mean ≥
    :data:`LARGE_GAIN`; partly: mean gain > 0; not reproduced otherwise."""
    vals = [float(g) for per_n in gains.values() for g in per_n.values()]
    if not vals:
        return _v(NOT_TESTABLE, "no gain was measured")
    mean = sum(vals) / len(vals)
    ours = "; ".join(f"{m} " + "/".join(f"{g:+.1f}" for _, g in _ordered(per_n)) for m, per_n in gains.items())
    ours += f" (mean {mean:+.1f})"
    if all(g > 0 for g in vals) and mean >= LARGE_GAIN:
        return _v(REPRODUCED, f"SB helps every method at every N, by {mean:.1f} points on average", ours)
    if mean > 0:
        return _v(PARTLY, "SB helps on average, but not everywhere or by less than a large margin", ours)
    return _v(NOT_REPRODUCED, "SB does not improve the merged models on average", ours)


def sb_lines_complementary(combined: Mapping[int, float], sb: Mapping[int, float],
                           lines: Mapping[int, float]) -> Verdict:
    """Table 1: SB and LiNeS are complementary: TA+LiNeS+SB (``combined``) beats both TA+SB
    (``sb``) and TA+LiNeS (``lines``), per N. Reproduced at every N; partly at some N."""
    ns = sorted(set(combined) & set(sb) & set(lines))
    if not ns:
        return _v(NOT_TESTABLE, "no task count with all three variants")
    wins = [n for n in ns if combined[n] > max(sb[n], lines[n])]
    ours = "; ".join(f"N={n}: {combined[n]:.1f} vs {sb[n]:.1f} / {lines[n]:.1f}" for n in ns)
    if len(wins) == len(ns):
        return _v(REPRODUCED, "TA+LiNeS+SB beats TA+SB and TA+LiNeS at every N", ours)
    if wins:
        return _v(PARTLY, f"TA+LiNeS+SB beats both at {len(wins)} of {len(ns)} task counts", ours)
    return _v(NOT_REPRODUCED, "TA+LiNeS+SB never beats both TA+SB and TA+LiNeS", ours)


def beta_robust(accuracy: Mapping[float, Mapping[int, float]]) -> Verdict:
    """Tables 3a, 7, 8: results are robust to β and β = 0 is best. ``accuracy``: β → N →
    accuracy of TA+SB. Robust: spread over β ≤ :data:`BETA_SPREAD` points at every N; β = 0
    best: within :data:`BETA0_TOLERANCE` of the best β at every N. Both: reproduced; one: partly."""
    if len(accuracy) < 2:
        return _v(NOT_TESTABLE, "needs at least two values of β")
    ns = sorted(set.intersection(*(set(v) for v in accuracy.values())))
    if not ns:
        return _v(NOT_TESTABLE, "no task count shared by every β")
    spreads = {n: max(a[n] for a in accuracy.values()) - min(a[n] for a in accuracy.values()) for n in ns}
    robust = all(s <= BETA_SPREAD for s in spreads.values())
    zero = accuracy.get(0.0)
    best0 = zero is not None and all(zero[n] >= max(a[n] for a in accuracy.values()) - BETA0_TOLERANCE for n in ns)
    ours = "spread over β " + "/".join(f"{spreads[n]:.1f}" for n in ns) + " points; β = 0 " + (
        "best" if best0 else "not best" if zero is not None else "not run")
    if robust and best0:
        return _v(REPRODUCED, "accuracy barely depends on β and β = 0 is best", ours)
    if robust or best0:
        return _v(PARTLY, "robust to β" if robust else "β = 0 is best, but accuracy depends on β", ours)
    return _v(NOT_REPRODUCED, "accuracy depends on β and β = 0 is not best", ours)


def both_layer_types(mlp: float, attn: float, both: float) -> Verdict:
    """Table 3b: boosting both layer types beats boosting MLP or attention only. Reproduced:
    ``both`` above both; partly: above one of them."""
    ours = f"MLP {mlp:.1f}, attention {attn:.1f}, both {both:.1f}"
    if both > max(mlp, attn):
        return _v(REPRODUCED, "boosting both layer types is best", ours)
    if both > min(mlp, attn):
        return _v(PARTLY, "boosting both beats one single layer type only", ours)
    return _v(NOT_REPRODUCED, "boosting both layer types is not better than either alone", ours)


def matches_sota(ours_by_n: Mapping[int, float], best_other_by_n: Mapping[int, float]) -> Verdict:
    """Table 4: TA+LiNeS+SB matches TSV-M / Iso-C / Iso-CTS: at most :data:`MATCH_TOLERANCE`
    points below the best of them. Reproduced at every N; partly at some N."""
    ns = sorted(set(ours_by_n) & set(best_other_by_n))
    if not ns:
        return _v(NOT_TESTABLE, "no task count with both")
    ok = [n for n in ns if ours_by_n[n] >= best_other_by_n[n] - MATCH_TOLERANCE]
    ours = "; ".join(f"N={n}: {ours_by_n[n]:.1f} vs {best_other_by_n[n]:.1f}" for n in ns)
    if len(ok) == len(ns):
        return _v(REPRODUCED, "on par with or above the best of TSV-M / Iso-C / Iso-CTS at every N", ours)
    if ok:
        return _v(PARTLY, f"on par at {len(ok)} of {len(ns)} task counts", ours)
    return _v(NOT_REPRODUCED, "below the best of TSV-M / Iso-C / Iso-CTS at every N", ours)


def merge_time(sb_seconds: float, other_seconds: Mapping[str, float]) -> Verdict:
    """Table 6: SB merges in a fraction of the state of the art's time. Reproduced: every other
    method takes ≥ :data:`MIN_SPEEDUP` × SB's time; partly: each is slower than SB."""
    if not other_seconds or not _finite(sb_seconds, *other_seconds.values()) or sb_seconds <= 0:
        return _v(NOT_TESTABLE, "no usable timings")
    ratios = {m: s / sb_seconds for m, s in other_seconds.items()}
    ours = ", ".join(f"{m} {r:.1f}×" for m, r in ratios.items()) + " the time of TA+SB"
    low = min(ratios.values())
    if low >= MIN_SPEEDUP:
        return _v(REPRODUCED, f"every other method takes at least {MIN_SPEEDUP:g}× SB's time", ours)
    if low > 1:
        return _v(PARTLY, "SB is faster, but not by a large factor", ours)
    return _v(NOT_REPRODUCED, "some method merges as fast as SB or faster", ours)


def prop1(bound_holds: int, measurements: int, slope_dense: float, slope_lowrank: float) -> Verdict:
    """Prop. 1: ‖Δunique‖₂ ≤ ‖Δunique‖_F ≤ B/√N. Reproduced: the bound holds in every
    measurement and the spectral norm decays at least like N^-1/2 (slopes ≤ -0.5 +
    :data:`SLOPE_TOLERANCE`) for both kinds of unique parts; partly: the bound holds only."""
    ours = f"bound {bound_holds}/{measurements}; slopes {slope_dense:+.3f} / {slope_lowrank:+.3f}"
    limit = paper.PROP_EXPONENTS["prop1_unique"] + SLOPE_TOLERANCE
    decays = slope_dense <= limit and slope_lowrank <= limit
    if bound_holds == measurements and decays:
        return _v(REPRODUCED, "bound holds everywhere and the norm decays like 1/√N or faster", ours)
    if bound_holds == measurements:
        return _v(PARTLY, "bound holds, but the spectral norm decays more slowly than 1/√N", ours)
    return _v(NOT_REPRODUCED, "the bound is violated", ours)


def prop2(gap_first: float, gap_last: float, slope: float) -> Verdict:
    """Prop. 2: srank(Δm) → srank(Δcommon). Reproduced: the gap shrinks from the smallest to
    the largest N and its log-log slope is negative; partly: it shrinks only."""
    ours = f"gap {gap_first:.3g} → {gap_last:.3g}, slope {slope:+.2f}"
    if gap_last < gap_first and slope < 0:
        return _v(REPRODUCED, "the stable rank approaches the common part's", ours)
    if gap_last < gap_first:
        return _v(PARTLY, "the gap shrinks, but not steadily", ours)
    return _v(NOT_REPRODUCED, "the gap does not shrink", ours)


def prop3(slope: float, alpha_spread: float, bound_holds: int, measurements: int) -> Verdict:
    """Prop. 3: the common/unique ratio grows at least like √N for any α. Three checks: slope ≥
    0.5 - :data:`SLOPE_TOLERANCE`, relative change over α ≤ :data:`ALPHA_INDEPENDENCE`, lower
    bound holds everywhere. All: reproduced; some: partly; none: not reproduced."""
    checks = [slope >= paper.PROP_EXPONENTS["prop3_ratio"] - SLOPE_TOLERANCE, alpha_spread <= ALPHA_INDEPENDENCE,
              bound_holds == measurements]
    ours = f"slope {slope:+.3f}; α changes it by ≤ {alpha_spread:.0e}; bound {bound_holds}/{measurements}"
    if all(checks):
        return _v(REPRODUCED, "ratio grows like √N, independent of α, bound holds", ours)
    if any(checks):
        return _v(PARTLY, f"{sum(checks)} of 3 checks pass (slope, α-independence, bound)", ours)
    return _v(NOT_REPRODUCED, "none of slope, α-independence, bound holds", ours)


def prop4(agreement: float, cases: int) -> Verdict:
    """Prop. 4 (Eq. 29): boosting helps iff ‖Δsignal‖² > d_noise σβ². Reproduced: the sign of
    the measured gain agrees in every case; partly: in ≥ :data:`PROP4_PARTLY` of them."""
    if cases < 1:
        return _v(NOT_TESTABLE, "no case measured")
    ours = f"sign agrees in {agreement:.1%} of {cases} cases"
    if agreement >= 1.0:
        return _v(REPRODUCED, "Eq. 29 predicts the sign of the gain in every case", ours)
    if agreement >= PROP4_PARTLY:
        return _v(PARTLY, "Eq. 29 predicts the sign in most cases", ours)
    return _v(NOT_REPRODUCED, "Eq. 29 often mispredicts the sign", ours)


def n_gamma(best_head: float, best_tail: float, real_vectors: bool) -> Verdict:
    """Supp. E.4: singular values divided by N^γ collapse at γ = 1 (head) and γ = 0.5 (tail)
    on real task vectors. Run on synthetic vectors only, the claim is not testable here; the
    reason says whether the synthetic collapse lies within :data:`GAMMA_TOLERANCE`."""
    head, tail = paper.PROP_EXPONENTS["e4_head_gamma"], paper.PROP_EXPONENTS["e4_tail_gamma"]
    ok = abs(best_head - head) <= GAMMA_TOLERANCE and abs(best_tail - tail) <= GAMMA_TOLERANCE
    ours = f"γ = {best_head:.2f} (head) / {best_tail:.2f} (tail)" + ("" if real_vectors else ", synthetic")
    if not real_vectors:
        return _v(NOT_TESTABLE, "the paper's test uses real task vectors; synthetic vectors "
                  + ("collapse as predicted" if ok else "do not collapse as predicted"), ours)
    return _v(REPRODUCED if ok else NOT_REPRODUCED, "collapse exponents as predicted" if ok else
              "collapse exponents differ from 1 / 0.5", ours)


def gsv_lower_rank(lower_rank: int, matrices: int, srank_merged: float, srank_single: float) -> Verdict:
    """Fig. 5a: in a shared HO-GSVD basis, the average occupies a lower-rank subspace: fewer
    effective directions and more near-zero σ than a single expert. ``lower_rank``: matrices
    where both hold. All matrices: reproduced; some: partly."""
    if matrices < 1:
        return _v(NOT_TESTABLE, "no matrix decomposed")
    ours = f"{lower_rank}/{matrices} matrices; Σσ²/max σ² {srank_merged:.1f} vs {srank_single:.1f}"
    if lower_rank == matrices:
        return _v(REPRODUCED, "the average uses fewer shared directions in every matrix", ours)
    if lower_rank:
        return _v(PARTLY, "the average uses fewer shared directions in some matrices", ours)
    return _v(NOT_REPRODUCED, "the average does not use fewer shared directions", ours)


def alignment_depth(per_block: Sequence[float], rising_sublayers: int, sublayers: int) -> Verdict:
    """Supp. H: alignment is low in shallow and higher in deep blocks. ``per_block``: mean
    off-diagonal alignment per block, shallowest first. Reproduced: the last block is higher
    than the first, the mean never falls with depth and at least half of the sublayer types
    rise; partly: the last block is higher only."""
    vals = [float(v) for v in per_block]
    if len(vals) < 2:
        return _v(NOT_TESTABLE, "needs at least two blocks")
    ours = "per block " + ", ".join(f"{v:.3f}" for v in vals) + f"; {rising_sublayers}/{sublayers} sublayers rise"
    monotone = all(b >= a for a, b in zip(vals, vals[1:]))
    if vals[-1] > vals[0] and monotone and 2 * rising_sublayers >= sublayers:
        return _v(REPRODUCED, "alignment grows steadily with depth", ours)
    if vals[-1] > vals[0]:
        return _v(PARTLY, "the deepest block is higher, but alignment does not grow steadily", ours)
    return _v(NOT_REPRODUCED, "alignment is not higher in the deepest block", ours)


def beyond_noise(diff: float, random_std: float, draws: int) -> bool:
    """|diff| > :data:`NOISE_STDERRS` standard errors of the random mean (False when that
    cannot be told: fewer than 2 draws, or draws without spread)."""
    if draws < 2 or not random_std > 0:
        return False
    return abs(diff) > NOISE_STDERRS * random_std / math.sqrt(draws)


def selection_beats_random(ho: float, random_mean: float, random_std: float, draws: int) -> Verdict:
    """Tables 5, 10: HO-GSVD selection beats random selection. Reproduced: above the random
    mean by more than :data:`NOISE_STDERRS` standard errors; partly: above, within the noise;
    not testable with fewer than 2 random draws."""
    if draws < 2:
        return _v(NOT_TESTABLE, "needs at least two random draws")
    diff = ho - random_mean
    ours = f"{ho:.1f} vs {random_mean:.1f} ± {random_std:.1f} ({draws} draws)"
    if diff > 0 and beyond_noise(diff, random_std, draws):
        return _v(REPRODUCED, "selection beats the random mean beyond its noise", ours)
    if diff > 0:
        return _v(PARTLY, "selection is above the random mean, within its noise", ours)
    return _v(NOT_REPRODUCED, "selection is not above the random mean", ours)


def higher_order_sb(ho_by_n: Mapping[int, float], best_by_n: Mapping[int, float]) -> Verdict:
    """Table 9: Higher-Order SB+LiNeS is competitive: within :data:`COMPETITIVE_GAP` points of
    the best SB row. Reproduced at every N; partly at some N."""
    ns = sorted(set(ho_by_n) & set(best_by_n))
    if not ns:
        return _v(NOT_TESTABLE, "no task count with both")
    ok = [n for n in ns if best_by_n[n] - ho_by_n[n] <= COMPETITIVE_GAP]
    ours = "; ".join(f"N={n}: {ho_by_n[n]:.1f} vs best {best_by_n[n]:.1f}" for n in ns)
    if len(ok) == len(ns):
        return _v(REPRODUCED, "within the margin of the best SB variant at every N", ours)
    if ok:
        return _v(PARTLY, f"within the margin at {len(ok)} of {len(ns)} task counts", ours)
    return _v(NOT_REPRODUCED, "clearly below the best SB variant", ours)


def language_sb(ta: float, ta_sb: float, ta_lines: float, ta_lines_sb: float) -> Verdict:
    """Table 2: SB improves language merging. Reproduced: TA+LiNeS+SB beats TA by ≥
    :data:`LARGE_GAIN` points and TA+SB beats TA; partly: one of the two improves on TA."""
    gain = ta_lines_sb - ta
    ours = f"TA {ta:.1f} → TA+SB {ta_sb:.1f}; TA+LiNeS {ta_lines:.1f} → TA+LiNeS+SB {ta_lines_sb:.1f}"
    if gain >= LARGE_GAIN and ta_sb > ta:
        return _v(REPRODUCED, f"SB adds {gain:.1f} points with LiNeS and helps TA alone", ours)
    if gain > 0 or ta_sb > ta:
        return _v(PARTLY, "SB helps, but by less than a large margin or not in both variants", ours)
    return _v(NOT_REPRODUCED, "SB does not improve the merged language models", ours)


# ----------------------------------------------------------------------------- the claims


def _gains(rows: Sequence[tuple[str, str]]) -> str:
    t = paper.TABLE1_VIT_B32
    return "; ".join(f"{b.split('+')[0]} " + "/".join(f"{y - x:+.1f}" for x, y in zip(t[a], t[b])) for a, b in rows)


def _tuple(values: Sequence[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


def _spreads() -> str:
    cols = list(zip(*paper.TABLE7_VIT_B32.values()))
    return "/".join(f"{max(c) - min(c):.1f}" for c in cols)


def _table4_best() -> str:
    t = paper.TABLE4_VIT_B32
    best = [max(t[m][i] for m in ("TSV-M", "Iso-C", "Iso-CTS")) for i in range(3)]
    return f"{_tuple(t['TA+LiNeS+SB'])} vs best other {_tuple(best)}"


def _claims() -> list[Claim]:
    ex, ch2, ch3, ch4, ch5 = "01_rank_collapse", "02_propositions", "03_subspace_boosting", "04_hogsvd", "05_language"
    t1, t2, t6, t9 = paper.TABLE1_VIT_B32, paper.TABLE2_T5, paper.TABLE6_SECONDS, paper.TABLE9_VIT_B32
    pe = paper.PROP_EXPONENTS
    return [
        Claim("rank-collapse", "Rank collapse grows with the number of merged experts", "Sec. 3, Fig. 2, 3, 7", ex,
              "claim-rank-collapse", "stable rank falls across a majority of layers",
              f"mean stable rank never rises with N, falls overall, and falls for ≥ {RANK_FALLING_SHARE:.0%} of "
              "the block matrices: reproduced; falls overall only: partly", rank_collapse),
        Claim("rank-accuracy", "Falling stable rank goes with falling accuracy", "Fig. 2d", ex, "claim-rank-accuracy",
              "strong correlation",
              f"Pearson r (TA, across N) ≥ {STRONG_CORRELATION}: reproduced; ≥ {WEAK_CORRELATION}: partly; "
              f"fewer than {MIN_CORRELATION_POINTS} task counts: not testable", rank_accuracy),
        Claim("sb-raises-rank", "Subspace Boosting raises the stable rank of merged matrices", "Fig. 1a, 6", ex,
              "claim-sb-raises-rank", "higher stable rank for TA, TIES, Consensus",
              "raised for every method: reproduced; for some: partly", sb_raises_rank),
        Claim("sb-improves", "SB improves TA, TIES and Consensus by large margins", "Table 1", ch3, "claim-table1",
              _gains([("TA", "TA+SB"), ("TIES", "TIES+SB"), ("Consensus", "Consensus+SB")]) + " points (B/32)",
              f"every gain > 0 and mean gain ≥ {LARGE_GAIN:g} points: reproduced; mean gain > 0: partly",
              sb_improves_merging),
        Claim("sb-lines", "SB and LiNeS are complementary", "Table 1", ch3, "claim-table1",
              f"TA+LiNeS+SB {_tuple(t1['TA+LiNeS+SB'])} vs TA+SB {_tuple(t1['TA+SB'])}",
              "TA+LiNeS+SB above both TA+SB and TA+LiNeS at every N: reproduced; at some N: partly",
              sb_lines_complementary),
        Claim("beta", "β is robust and β = 0 is best", "Tables 3a, 7, 8", ch3, "claim-beta",
              f"spread over β {_spreads()} points (B/32); B/16: {_tuple(paper.TABLE3_BETA.values())}",
              f"spread over β ≤ {BETA_SPREAD:g} points at every N and β = 0 within {BETA0_TOLERANCE:g} of the best: "
              "reproduced; one of the two: partly", beta_robust),
        Claim("layer-types", "Boosting both layer types helps", "Table 3b", ch3, "claim-summary-3",
              "MLP {mlp:g}, attention {attn:g}, both {both:g} (B/16)".format(**paper.TABLE3_LAYERS),
              "both above MLP-only and attention-only: reproduced; above one: partly", both_layer_types),
        Claim("sota", "TA+LiNeS+SB matches TSV-M, Iso-C and Iso-CTS", "Table 4", ch3, "claim-table4",
              _table4_best(), f"at most {MATCH_TOLERANCE:g} point below the best of them at every N: reproduced; "
              "at some N: partly", matches_sota),
        Claim("merge-time", "… at a fraction of their merge time", "Table 6", ch3, "claim-summary-3",
              f"SB {t6['SB'][0]:g} s vs TSV-M {t6['TSV-M'][0]:g} s (20 tasks, B/32, GPU)",
              f"TSV-M and Iso-CTS each take ≥ {MIN_SPEEDUP:g}× the time of TA+SB: reproduced; both slower: partly "
              "(Iso-C, one SVD of the sum, costs what SB costs by construction; the paper times TSV-M only)",
              merge_time),
        Claim("prop1", "Prop. 1: the task-specific part decays like 1/√N", "Sec. 3.1, Supp. E, Eq. 15", ch2,
              "claim-prop1", f"‖Δunique‖₂ ≤ B·N^{pe['prop1_unique']:g}",
              f"bound holds everywhere and slopes ≤ {pe['prop1_unique'] + SLOPE_TOLERANCE:g}: reproduced; "
              "bound only: partly", prop1),
        Claim("prop2", "Prop. 2: the stable rank tends to the common part's", "Supp. E, Eq. 16", ch2, "claim-prop2",
              "limit (proved)", "gap shrinks with a negative log-log slope: reproduced; shrinks only: partly", prop2),
        Claim("prop3", "Prop. 3: the common part dominates like √N, whatever α", "Supp. E, Eq. 26-28", ch2,
              "claim-prop3", f"slope ≥ {pe['prop3_ratio']:g}, independent of α",
              f"slope ≥ {pe['prop3_ratio'] - SLOPE_TOLERANCE:g}, α changes the ratio by ≤ {ALPHA_INDEPENDENCE:g} "
              "and the bound holds: reproduced; some of these: partly", prop3),
        Claim("prop4", "Prop. 4: boosting helps iff the signal outweighs the amplified noise", "Supp. E, Eq. 29",
              ch2, "claim-prop4", "iff ‖Δsignal‖² > d_noise·σβ² (proved)",
              f"sign of the gain agrees in every case: reproduced; in ≥ {PROP4_PARTLY:.0%}: partly", prop4),
        Claim("n-gamma", "The N^γ test: head collapses at γ = 1, tail at γ = 0.5", "Supp. E.4, Fig. 10-12", ch2,
              "claim-n-gamma", f"γ = {pe['e4_head_gamma']:g} / {pe['e4_tail_gamma']:g} (real ViT task vectors)",
              f"best γ within {GAMMA_TOLERANCE:g} of the prediction on real task vectors; synthetic vectors only: "
              "not testable", n_gamma),
        Claim("gsv-lower-rank", "In a shared basis the merged task vector occupies a lower-rank subspace",
              "Sec. 4.2, Fig. 5a", ch4, "claim-gsv", "many generalised σ near zero for the average",
              "fewer effective directions and more near-zero σ in every matrix: reproduced; in some: partly",
              gsv_lower_rank),
        Claim("alignment-depth", "Alignment rises with depth", "Supp. H, Fig. 13", ch4, "claim-alignment-depth",
              "layer 0 low, deeper layers more defined",
              "last block above the first, never falling, half the sublayers rising: reproduced; last above first "
              "only: partly", alignment_depth),
        Claim("selection-pool", "HO-GSVD selection beats random (pool tasks)", "Table 5", ch4, "claim-selection",
              "{:g} vs {:g} (random)".format(paper.TABLE5["HO-GSVD"][0], paper.TABLE5["Random"][0]),
              f"above the random mean by > {NOISE_STDERRS:g} standard errors: reproduced; above: partly",
              selection_beats_random),
        Claim("selection-all", "HO-GSVD selection beats random (all tasks)", "Table 10", ch4, "claim-selection",
              "{:g} vs {:g} ± {:g} (random)".format(paper.TABLE10["HO-GSVD"], paper.TABLE10["Random"],
                                                     paper.TABLE10["Random (std)"]),
              f"above the random mean by > {NOISE_STDERRS:g} standard errors: reproduced; above: partly",
              selection_beats_random),
        Claim("higher-order-sb", "Higher-Order SB is competitive", "Table 9", ch4, "claim-table9",
              f"{_tuple(t9['Higher-Order SB+LiNeS'])} vs TA+SB+LiNeS {_tuple(t9['TA+SB+LiNeS'])} (B/32)",
              f"within {COMPETITIVE_GAP:g} points of the best SB row at every N: reproduced; at some N: partly",
              higher_order_sb),
        Claim("language", "SB improves language merging", "Sec. 5.1, Table 2", ch5, "claim-table2",
              f"T5: TA {_tuple(t2['TA'])} → SB {_tuple(t2['SB'])} (8 QA / 7 NLP)",
              f"TA+LiNeS+SB ≥ TA + {LARGE_GAIN:g} points and TA+SB > TA: reproduced; one of them improves: partly",
              language_sb),
    ]


#: Every claim, by id, in the order of the findings table.
CLAIMS: dict[str, Claim] = {c.id: c for c in _claims()}


# ----------------------------------------------------------------------------- records


def write_record(output_dir: str | os.PathLike | None, chapter: str, verdicts: Mapping[str, Verdict],
                 provenance: Any = None, suite: str = "") -> Path | None:
    """Write a chapter's verdicts to ``<output_dir>/claims.json`` (atomically) and return the
    path; nothing when ``output_dir`` is None. ``verdicts``: claim id → :class:`Verdict`;
    every id must be a claim of ``chapter``. ``provenance``: a
    :class:`subboost.book.Provenance` (or a mapping); ``suite``: what was merged."""
    for cid in verdicts:
        if cid not in CLAIMS:
            raise ValueError(f"unknown claim id {cid!r}; known: {', '.join(CLAIMS)}")
        if CLAIMS[cid].chapter != chapter:
            raise ValueError(f"claim {cid!r} belongs to chapter {CLAIMS[cid].chapter}, not {chapter}")
    if output_dir is None:
        return None
    prov = provenance.as_dict() if hasattr(provenance, "as_dict") else dict(provenance or {})
    data = dict(chapter=chapter, suite=str(suite), provenance=prov,
                verdicts={cid: asdict(v) for cid, v in verdicts.items()})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".claims.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out / RECORD_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out / RECORD_NAME


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def verdict_table(verdicts: Mapping[str, Verdict]):
    """A chapter's verdicts as a ``pandas.DataFrame`` indexed by claim statement: where,
    paper, ours, verdict, reason (for the chapter's own summary)."""
    import pandas as pd

    rows = [dict(claim=CLAIMS[cid].statement, where=CLAIMS[cid].where, paper=CLAIMS[cid].paper, ours=v.ours,
                 verdict=v.verdict, reason=v.reason) for cid, v in verdicts.items()]
    return pd.DataFrame(rows).set_index("claim")


def findings_rows(executed_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per claim of :data:`CLAIMS` from the records under ``executed_dir``
    (``<chapter>/claims.json``): id, claim, where, paper, ours, verdict, reason, rule, chapter,
    section, suite, profile, device, commit; claims without a record are :data:`NOT_RUN`."""
    records: dict[str, dict] = {}
    for chapter in sorted({c.chapter for c in CLAIMS.values()}):
        path = Path(executed_dir) / chapter / RECORD_NAME
        if path.is_file():
            try:
                records[chapter] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
    rows = []
    for c in CLAIMS.values():
        rec = records.get(c.chapter, {})
        v = rec.get("verdicts", {}).get(c.id)
        prov = rec.get("provenance", {})
        commit = str(prov.get("commit", "")) + ("+" if prov.get("dirty") else "")
        rows.append(dict(id=c.id, claim=c.statement, where=c.where, paper=c.paper,
                         ours=v["ours"] if v else "", verdict=v["verdict"] if v else NOT_RUN,
                         reason=v["reason"] if v else "", rule=c.rule_text, chapter=c.chapter, section=c.section,
                         suite=rec.get("suite", "") if v else "", profile=prov.get("profile", "") if v else "",
                         device=prov.get("device", "") if v else "", commit=commit if v else ""))
    return rows


def short_suite(suite: str) -> str:
    """The name of a suite from its repr (``Suite('zoo:smoke-…', model=…)`` → ``zoo:smoke-…``),
    for the findings table; other text unchanged."""
    m = re.match(r"^\w+\('([^']+)'", suite)
    return m.group(1) if m else suite


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def findings_markdown(rows: Sequence[Mapping[str, Any]], linked: Callable[[str], bool] = lambda ch: True) -> str:
    """The findings table as MyST Markdown (a pipe table; the evidence column links to the
    chapter section with ``{ref}`` where ``linked(chapter)``), followed by the rules."""
    head = "| Claim | Paper | Ours | Verdict | Evidence | Run (suite · profile · device · commit) |"
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        ev = f"{{ref}}`{r['where']} <{r['section']}>`" if linked(r["chapter"]) else _cell(r["where"])
        run = " · ".join(_cell(short_suite(r[k]) if k == "suite" else r[k])
                         for k in ("suite", "profile", "device", "commit") if r[k]) or "—"
        verdict = f"**{r['verdict']}**" + (f": {_cell(r['reason'])}" if r["reason"] else "")
        lines.append(f"| {_cell(r['claim'])} | {_cell(r['paper'])} | {_cell(r['ours']) or '—'} | {verdict} | {ev} | {run} |")
    rules = ["", "## The rules", "",
             "Each verdict comes from a rule in `subboost.claims` applied to the chapter's measurements; "
             "the thresholds are:", ""]
    rules += [f"- **{_cell(r['claim'])}** ({r['where']}): {r['rule']}." for r in rows]
    return "\n".join(lines + rules) + "\n"


def findings_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The findings table as plain text for a terminal: claim, paper, ours, verdict."""
    width = max(len(r["claim"]) for r in rows)
    out = [f"{'claim':<{width}}  {'verdict':<18}  ours  [paper]"]
    for r in rows:
        out.append(f"{r['claim']:<{width}}  {r['verdict']:<18}  {r['ours'] or '-'}  [{r['paper']}]")
    return "\n".join(out) + "\n"
