import os

# the Triton interpreter must be chosen before triton is first imported (kernel tests use it)
os.environ.setdefault("TRITON_INTERPRET", "1")
