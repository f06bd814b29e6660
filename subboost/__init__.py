"""subboost: an executable companion to *Subspace-Boosted Model Merging*.

Modules, one idea each:

- :mod:`subboost.taskvector` -- task vectors, key classification (which tensors are
  "block matrices"), applying a merged update to the base.
- :mod:`subboost.boost` -- Subspace Boosting (paper Alg. 1).
- :mod:`subboost.spectral` -- stable rank, energy rank, spectra as tidy tables.
- :mod:`subboost.merging` -- merging methods registered by name (TA, TIES, Consensus,
  LiNeS, Iso-C, Iso-CTS, TSV-M, ...), shared by notebooks, CLI and tests.
- :mod:`subboost.hogsvd` -- HO-GSVD, alignment matrices, expert selection, Higher-Order SB.
- :mod:`subboost.io` -- reading checkpoints (safetensors, torch files, restricted unpickling),
  the public checkpoint layouts, atomic and exclusive writing.
- :mod:`subboost.streaming` -- merging checkpoints tensor by tensor (the CLI's engine).
"""

__version__ = "0.1.0"
