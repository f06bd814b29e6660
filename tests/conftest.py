"""Test-session settings.

The tests use tiny matrices and models: one intra-op thread avoids the synchronisation cost
that multi-threaded BLAS/LAPACK pays on them (severe on a busy 2-core machine).
"""

import torch

torch.set_num_threads(1)
