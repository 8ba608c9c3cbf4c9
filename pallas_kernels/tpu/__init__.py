"""TPU (Mosaic) Pallas kernels."""
