"""subboost: an executable companion to *Subspace-Boosted Model Merging*.

Where each part of the paper lives (shared mathematics first, then the chapters' own code):

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
- :mod:`subboost.synthetic` -- controlled task vectors for Props. 1–4 and the N^γ test
  (Sec. 3.1, Supp. E); chapter 2's set-up.
- :mod:`subboost.esm` -- Essential Subspace Merging, reimplemented from its abstract.
- :mod:`subboost.io` -- the one checkpoint I/O layer: readers, restricted unpickler, key rule,
  public layouts, atomic writer.
- :mod:`subboost.evaluate`, :mod:`subboost.experiments` -- suites (the mini zoo, real
  checkpoints), α sweeps, results tables (Tables 1, 3, 4, 6); :mod:`subboost.executor` runs
  their units locally or on a Ray cluster.
- :mod:`subboost.zoo`, :mod:`subboost.langzoo` -- the mini CLIP zoo and the MiniLM language zoo.
- :mod:`subboost.release`, :mod:`subboost.convert` -- the public checkpoint releases and their
  data folders.
- :mod:`subboost.interpret` -- chapter 4 (HO-GSVD spectra, alignment by depth, selection, Tables 5, 9, 10).
- :mod:`subboost.figures`, :mod:`subboost.plotting` -- figures of chapters 1, 3 and 2.
- :mod:`subboost.paper` -- every number quoted from the paper; :mod:`subboost.claims` -- the
  paper's claims with their verdict rules ("Findings at a glance").
- :mod:`subboost.book` -- the book runner (papermill, Jupyter Book); :mod:`subboost.cli` --
  ``subboost merge / diagnose / select``.
"""

__version__ = "0.1.0"
