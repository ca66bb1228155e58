"""Memory-bounded ops over codes: pure functions of their inputs, on one process's tensors (no
collectives, no module state, no loss composed across ranks; those live in the floors above).

One file per family of ops, each a pure-torch reference: `nearest_code.py` (the code search),
`code_softmax.py` (softmax over all codes, in tiles), `lfq_entropy.py` (LFQ's code mass and bit
entropies). The search and LFQ's dense code mass also have a Triton kernel behind the same call
(`triton_nearest_code.py`, `triton_lfq_entropy.py`); `backend.py` picks which runs and
`self_check.py` checks a kernel against its reference on first use.
"""
