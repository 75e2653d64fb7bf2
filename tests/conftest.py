"""Shared test set-up.

The test tensors are tiny, and on a small shared machine torch's default of one
intra-op thread per core makes them slower, not faster: when the other core is
busy, OpenMP's thread barriers can stall a 128×20 matmul for many seconds.
One thread keeps every test fast and its timing predictable.
"""

import torch

torch.set_num_threads(1)
