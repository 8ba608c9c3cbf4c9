"""GPU (Pallas on Triton) kernels."""
