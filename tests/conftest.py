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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; given to every test whose skipif reason names CUDA "
                                       "(python -m benchmarks.gpu_check runs them with -m cuda)")


def pytest_collection_modifyitems(config, items):
    """A test skipped without a GPU says so in its skip reason ("needs CUDA"): it gets the cuda
    marker, so a GPU machine can run exactly those (`pytest -m cuda`)."""
    for item in items:
        if any("cuda" in str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
