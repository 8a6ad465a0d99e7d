"""Shared test settings."""

import torch

# One intra-op thread: the suite is small per step, and on a shared 2-core machine several
# torch processes with two spinning OpenMP threads each slow one another down many times over.
torch.set_num_threads(1)
