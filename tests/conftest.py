import os

# the Triton interpreter must be chosen before triton is first imported (kernel tests use it)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For modules of many tiny ops: on a loaded 2-core machine the intra-op pool's wake-ups
    dominate (a 30x3 elementwise op: ~10 ms with 2 threads, ~0.3 ms with 1). Results do not
    depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
