"""Process-wide settings for the test session, applied before any test module
imports torch or torch_xla."""

import os

# torch's OpenMP workers busy-wait after each parallel region; on this 2-core
# machine they then starve XLA's and the C++ kernels' threads (60 LoRA steps on
# CPU tensors: ~15 s spinning vs ~0.15 s passive). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
