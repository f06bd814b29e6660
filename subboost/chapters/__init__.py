"""The book's chapters, one module each, holding what only that chapter uses (its runners,
sizes, claim-check glue and figures); each module's docstring names the paper sections it
covers. Shared pieces stay outside: the mathematics (:mod:`subboost.boost`,
:mod:`subboost.spectral`, :mod:`subboost.hogsvd`, :mod:`subboost.merging`,
:mod:`subboost.synthetic`), the evaluation protocol (:mod:`subboost.experiments`), the figure
style (:mod:`subboost.plotting`) and the paper's numbers (:mod:`subboost.paper`).

- :mod:`subboost.chapters.rank_collapse` -- chapter 1, ``notebooks/01_rank_collapse.md``:
  rank collapse of merged task vectors (Sec. 3, Fig. 1a, 2, 3, Supp. D).
- :mod:`subboost.chapters.propositions` -- chapter 2, ``notebooks/02_propositions.md``:
  Props. 1-4 and the N^γ test on controlled task vectors (Sec. 3.1, Supp. E).
- :mod:`subboost.chapters.subspace_boosting` -- chapter 3, ``notebooks/03_subspace_boosting.md``:
  Subspace Boosting's results, ablations and timings (Sec. 4.1, 5.1, 5.2, Supp. C, F; Tables 1, 3, 4, 6, 7).
- :mod:`subboost.chapters.hogsvd_alignment` -- chapter 4, ``notebooks/04_hogsvd.md``: HO-GSVD
  spectra, alignment, expert selection, Higher-Order SB (Sec. 4.2, 5.3, Supp. G, H, Tables 5, 9, 10).
- :mod:`subboost.chapters.language` -- chapter 5, ``notebooks/05_language.md``: the Table 2
  analogue on the MiniLM language zoo (Sec. 5.1).
- :mod:`subboost.chapters.zoo_calibration` -- the appendix, ``notebooks/06_zoo_calibration.md``:
  the mini zoo beside published measurements of real CLIP task vectors (v2 and v3), and the
  headline verdicts (Sec. 3 Fig. 2; Table 1; Table 3a; Table 5) recomputed on both zoos.

A later chapter may reuse an earlier chapter's code (chapter 5 draws chapter 1's rank figures
and chapter 3's accuracy-against-N figure) by importing that chapter's module.
"""
