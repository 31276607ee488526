import os
import sys

import torch

# Tests import their shared helpers (reference.py, catalogue.py, ...) by name.
sys.path.insert(0, os.path.dirname(__file__))

# Without CUDA the Triton kernels run under Triton's interpreter.  triton.jit
# picks compiled or interpreted when it decorates, so the variable must be set
# before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
