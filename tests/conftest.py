"""Test-session setup.

Triton reads TRITON_INTERPRET when it decorates kernels, so it is set here, before any test module
imports triton (directly, or through bitsandbytes or transformers): the kernels then run on CPU
tensors in Triton's interpreter. backend="auto" still picks the torch path on CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
