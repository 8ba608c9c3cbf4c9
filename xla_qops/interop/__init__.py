"""Import weights quantized by other tools, exactly; export to torch's tinygemm format.

Each importer returns an `xla_qops.QuantizedWeight` in API.md's convention
``w = scale * q - zero_point`` (int4 packed by default) whose dequantized
weight equals the source format's own float32 dequantization bit for bit —
checked on the actual weight at import time, with a clear error (and the
exact alternative) when the int4 form cannot be exact. docs/interop.md has
each format's convention, how it maps onto ours and when that is exact.

    from_gptq(qweight, qzeros, scales, g_idx=None, *, bits=4, version=1, ...)
    from_awq(qweight, qzeros, scales, ...)
    from_hqq(W_q, scale, zero, *, shape, group_size, nbits=4, axis=1, ...)
    from_int4pack(weight, scales_and_zeros, *, group_size=None, layout=None, ...)
    from_mlx(wq, scales, biases, *, group_size=64, bits=4, ...)
    from_compressed_tensors(tensors, *, num_bits, group_size=None, symmetric=True, ...)
        # int formats, and float-quantized (fp8), mxfp8, nvfp4- and mxfp4-pack-quantized
    to_compressed_tensors(qw, ...) -> CompressedTensorsLayer   # int, fp8 and fp4; vLLM reads it
    from_fp8_blocks(weight, weight_scale_inv, block=(128, 128))    # native fp8 (DeepSeek-V3)
    from_modelopt(tensors, *, quant_algo="NVFP4", group_size=16)  # NVIDIA ModelOpt NVFP4 / FP8
    from_gguf(data, ggml_type, shape, ...)     # Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q6_K MXFP4 NVFP4
    read_gguf(path) -> (weights, other tensors, metadata)      # a whole .gguf file
    read_checkpoint(source, *, format=None) -> ImportedCheckpoint
        # GPTQ / AWQ / compressed-tensors / fp8 / ModelOpt directory or file
    to_int4pack(qw, *, layout="cpu", inner_k_tiles=2, dtype=None) -> Int4Pack
    from_state_dict(tensors, format, **kwargs) -> (weights, other tensors)   # gptq/awq/mlx

Float formats (fp8 e4m3fn, fp4 e2m1; API.md section 7) come back holding
the checkpoint's own storage (``QuantizedWeight.format`` "fp8"/"fp4"), never
a dequantized copy, with the source's scale arithmetic applied once, so the
dequantized weight is the source's bit for bit.

Common keywords: ``target_bits`` (4 or 8; 8 trades memory for exactness in
the rare cases where 4 is not exact), ``pack`` (int4 two per byte, default
True), ``exact`` (default True: raise rather than return an inexact weight).
Inputs may be numpy, JAX or torch arrays.
"""

from xla_qops.interop import compressed_tensors
from xla_qops.interop.awq import from_awq
from xla_qops.interop.checkpoints import ImportedCheckpoint, read_checkpoint
from xla_qops.interop.compressed_tensors import from_compressed_tensors, to_compressed_tensors
from xla_qops.interop.floats import from_fp8_blocks, from_modelopt
from xla_qops.interop.ggml import from_gguf, read_gguf
from xla_qops.interop.gptq import from_gptq
from xla_qops.interop.hqq import from_hqq
from xla_qops.interop.int4pack import Int4Pack, from_int4pack, to_int4pack
from xla_qops.interop.mlx import from_mlx
from xla_qops.interop.state_dict import from_state_dict

__all__ = ["from_gptq", "from_awq", "from_hqq", "from_int4pack", "from_mlx", "to_int4pack",
           "Int4Pack", "from_state_dict", "from_compressed_tensors", "to_compressed_tensors",
           "from_fp8_blocks", "from_modelopt", "from_gguf", "read_gguf", "read_checkpoint",
           "ImportedCheckpoint"]
