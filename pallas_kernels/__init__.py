"""Pallas kernels for xla-qops' quantized matmul, and the layer below `xla_qops`.

* `pallas_kernels.tpu.quantized_matmul`: Mosaic kernels (TPU), all of W8A16,
  W4A16, W8A8, W4A8, per-channel and blockwise; the same kernel body runs on
  the CPU with ``interpret=True``.
* `pallas_kernels.gpu.quantized_matmul`: Triton kernels (GPU), same schemes.
* `pallas_kernels.block_sizes`: the one place block sizes are chosen, with
  per-call overrides and measured tables.
* `pallas_kernels.operands`: the shared prologue (API layouts -> kernel operands).
* `pallas_kernels.reference`: pure-JAX statement of the kernels' algebra.
* `pallas_kernels.tpu.mosaic_check`: checks an exported kernel as Mosaic
  would, without a TPU.

Shared with `xla_qops`, which builds on this package (this package imports
nothing from it):

* `pallas_kernels.activation`: the activation quantization of W8A8 / W4A8.
* `pallas_kernels.shapes`: named problem shapes (Llama-3-8B, real models).
* `pallas_kernels.jax_compat`: the differences between supported JAX versions.

`xla_qops.backends.pallas` is the project's entry point to these kernels.
"""
