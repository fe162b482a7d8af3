"""Test session set-up."""

import os

import torch

# Triton kernels run in the interpreter without a GPU; it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
