"""Decode-worker tests run the Triton kernels on the CPU through Triton's interpreter.

`triton.jit` reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before
any test module imports `decode_worker.*_triton`. On a CUDA machine the real kernels run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
