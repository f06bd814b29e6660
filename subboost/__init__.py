"""subboost: an executable companion to *Subspace-Boosted Model Merging*.

Where is chapter N's code? In ``subboost/chapters/``, one module per chapter, named after it
(each module's docstring names the paper sections it covers):

- chapter 1, ``notebooks/01_rank_collapse.md`` -- :mod:`subboost.chapters.rank_collapse`
  (Sec. 3, Fig. 1a, 2, 3, Supp. D);
- chapter 2, ``notebooks/02_propositions.md`` -- :mod:`subboost.chapters.propositions`
  (Sec. 3.1, Props. 1-4, Supp. E, Fig. 10);
- chapter 3, ``notebooks/03_subspace_boosting.md`` -- :mod:`subboost.chapters.subspace_boosting`
  (Sec. 4.1, 5.1, 5.2, Tables 1, 3, 4, 6, 7);
- chapter 4, ``notebooks/04_hogsvd.md`` -- :mod:`subboost.chapters.hogsvd_alignment`
  (Sec. 4.2, 5.3, Fig. 5, Supp. G, H, Tables 5, 9, 10);
- chapter 5, ``notebooks/05_language.md`` -- :mod:`subboost.chapters.language` (Sec. 5.1, Table 2).
- appendix, ``notebooks/06_zoo_calibration.md`` -- :mod:`subboost.chapters.zoo_calibration` (the
  zoo beside published values for real task vectors; Fig. 2, Tables 1, 3a, 5 on two zoos).

What the chapters share (mathematics first):

- :mod:`subboost.taskvector` -- task vectors Δ = θ − θ0, which tensors are block matrices,
  θ0 + α·Δm (Sec. 3).
- :mod:`subboost.spectral` -- stable rank (Eq. 2), energy rank, spectra as tidy tables (Sec. 3, Supp. D).
- :mod:`subboost.boost` -- Subspace Boosting, Alg. 1 (Sec. 4.1), its fast routes and the
  attention treatments.
- :mod:`subboost.merging` -- the merging methods registered by name, each one per-key kernel
  plus the whole-model statistics it declares: TA, TIES, Consensus/TALL, LiNeS, Iso-C,
  Iso-CTS, TSV-M, HO-SB, ESM (Sec. 5 baselines, Tables 1, 4); and the one engine that runs
  them (then SB, Alg. 1, and LiNeS) on task vectors in memory or read from disk.
- :mod:`subboost.streaming` -- checkpoints on disk as the engine's source: the same merges
  tensor by tensor, written to a safetensors file.
- :mod:`subboost.hogsvd` -- HO-GSVD, alignment matrices (Eq. 7), expert selection,
  Higher-Order SB, Alg. 2 (Sec. 4.2, Supp. G).
- :mod:`subboost.synthetic` -- controlled task vectors with known parts and the numerical
  checks of Props. 1-4 and of the N^γ test (Sec. 3.1, Supp. E).
- :mod:`subboost.esm` -- Essential Subspace Merging, reimplemented from its abstract.
- :mod:`subboost.io` -- the one checkpoint I/O layer: readers, restricted unpickler, key rule,
  public layouts, atomic writer.
- :mod:`subboost.evaluate`, :mod:`subboost.experiments` -- suites (the mini zoo, real
  checkpoints), α sweeps, the evaluation protocol and results tables shared by chapters 1, 3,
  4 and 5; :mod:`subboost.executor` runs their units locally or on a Ray cluster.
- :mod:`subboost.zoo`, :mod:`subboost.langzoo` -- the mini CLIP zoo and the MiniLM language zoo;
  :mod:`subboost.zoo_common` -- what both zoos share (config hashes, cache, command line);
  :mod:`subboost.calibration` -- the zoo's quantities beside published real task vectors.
- :mod:`subboost.release`, :mod:`subboost.convert` -- the public checkpoint releases and their
  data folders.
- :mod:`subboost.plotting` -- the figure style shared by every chapter.
- :mod:`subboost.paper` -- every number quoted from the paper; :mod:`subboost.claims` -- the
  paper's claims with their verdict rules ("Findings at a glance").
- :mod:`subboost.book` -- the book runner (papermill, Jupyter Book); :mod:`subboost.cli` --
  ``subboost merge / diagnose / select``.
"""

__version__ = "0.1.0"
