"""compressed-tensors checkpoints (vLLM / llm-compressor), one linear layer in and out.

A checkpoint whose ``config.json`` has ``quantization_config.quant_method =
"compressed-tensors"`` stores each quantized Linear (``N`` output features,
``K`` input features, ``G`` groups) under the layer's prefix as:

* ``pack-quantized`` (W4A16, W4A16_ASYM, W8A16): ``weight_packed`` int32
  ``[N, ceil(K * bits / 32)]``, the signed values plus ``2**(bits-1)`` packed
  along ``in``, value j of word i being input feature ``i * 32/bits + j`` at
  bits ``[j*bits, (j+1)*bits)`` (the last word zero-padded); ``weight_shape``
  ``[N, K]``; ``weight_zero_point`` (asymmetric only) int32
  ``[ceil(N * bits / 32), G]`` packed the same way along ``out``.
* ``int-quantized`` / ``naive-quantized`` (W8A8, W8A16 unpacked): ``weight``
  int8 ``[N, K]``; ``weight_zero_point`` (asymmetric only) int8 ``[N, G]``.
* ``weight_scale`` float ``[N, G]`` (``[N, 1]`` for the channel strategy,
  one value for the tensor strategy); ``weight_g_idx`` int ``[K]`` (optional,
  ``actorder="group"``): the group of each input feature.

Source convention (`compressed_tensors.quantization.lifecycle.forward.dequantize`)::

    w[n, k] = (q[n, k] - z[n, g]) * s[n, g]         g = g_idx[k] (or k // group_size)

with ``q`` and ``z`` signed integers of ``bits`` bits. compressed-tensors
evaluates it in the scale's dtype (bf16 for most checkpoints), rounding the
product once more; the reference here is the product rounded once to float32
(what its decompressor gives for float32 scales, and what vLLM's kernels
accumulate from). Mapping (``target_bits=bits``): ``q' = q``, ``scale = s``,
``zero_point = s * z``, exact whenever ``s * z`` is a float32 number: always
for bf16/f16 scales. ``target_bits=8`` for a 4-bit source stores ``q - z``
(in [-15, 15]) with no zero point, exact for any scale (as for GPTQ).

The float formats keep their storage (``QuantizedWeight.format`` "fp8" /
"fp4", API.md section 7; no zero point), with the scale arithmetic of
compressed-tensors' own dequantization applied once:

* ``float-quantized`` (FP8, FP8_DYNAMIC, FP8_BLOCK): ``weight``
  float8_e4m3fn ``[N, K]``; ``weight_scale`` float32/bf16/fp16 ``(1,)``
  (tensor), ``[N, 1]`` (channel), ``[N, K/g]`` (group) or ``[ceil(N/rows),
  ceil(K/cols)]`` (block, ``block_structure [rows, cols]``: blockwise
  ``B = cols``, each block's scale repeated over its rows; ``K % cols``
  refused). ``w = value * s``.
* ``mxfp8-quantized``: as above with ``weight_scale`` uint8 E8M0
  exponents per 32: ``s = 2**(e - 127)``.
* ``nvfp4-pack-quantized`` (strategy "tensor_group", group 16):
  ``weight_packed`` uint8 ``[N, K/2]`` (even index low), ``weight_scale``
  float8_e4m3fn ``[N, K/16]``, ``weight_global_scale`` float32 ``(1,)``, a
  divisor: ``s = float32(weight_scale / weight_global_scale)``.
* ``mxfp4-pack-quantized`` (strategy "group", group 32): ``weight_packed``,
  ``weight_scale`` uint8 E8M0 ``[N, K/32]``: ``s = 2**(e - 127)``.

``input_scale`` / ``input_global_scale`` (static activation scales) are
accepted and not used: float weights run with dynamic per-token fp8
activations. docs/interop.md has the table and what each is checked against.

Dynamic per-token int8 activations (``input_activations`` with
``dynamic: true``, ``strategy: "token"``; the W8A8 and W4A8 schemes) are
``quantize_activation=True`` in `xla_qops.quantized_matmul`; the weight
importer does not need them (`scheme_args` reads them from the config).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import ml_dtypes
import numpy as np

from xla_qops.interop import _core, floats
from xla_qops.interop.gptq import subtract_zero_candidates

# What this module reads; every other compressed-tensors format is refused by name.
INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
# float formats -> (element format, bits, default group size)
FLOAT_FORMATS = {"float-quantized": ("fp8", 8, None), "mxfp8-quantized": ("fp8", 8, 32),
                 "nvfp4-pack-quantized": ("fp4", 4, 16), "mxfp4-pack-quantized": ("fp4", 4, 32)}
FORMATS = INT_FORMATS + tuple(FLOAT_FORMATS)
_OTHER_FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask", "marlin-24",
                  "mixed-precision")
STRATEGIES = ("group", "channel", "tensor", "block", "tensor_group")
_BITS = (4, 8)


def _check_format(fmt: str) -> None:
    if fmt in FORMATS:
        return
    what = ("a compressed-tensors format this importer does not read (dense or "
            "sparse weights have no quantized form in API.md's convention)"
            if fmt in _OTHER_FORMATS else "not a compressed-tensors format")
    raise ValueError(f"compression_format: {fmt!r} is {what}; expected one of "
                     f"{', '.join(FORMATS)}")


def _tensor(tensors: Mapping, name: str, required: bool = True):
    if name in tensors:
        return tensors[name]
    if required:
        raise KeyError(f"tensors: expected a {name!r} entry, got keys {sorted(tensors)}")
    return None


def _scale_groups(scale: np.ndarray, strategy: str, n: int, k: int,
                  group_size: int | None) -> tuple[np.ndarray, int]:
    """(scale as [G, N], group size along K) for `strategy`, checked."""
    if strategy == "tensor":
        if scale.size != 1:
            raise ValueError(f"weight_scale: the tensor strategy has one scale, got shape "
                             f"{_core.shape_str(scale.shape)}")
        return np.broadcast_to(scale.reshape(1, 1), (1, n)), k
    if strategy == "channel":
        if scale.shape not in ((n, 1), (n,)):
            raise ValueError(f"weight_scale: the channel strategy expects shape [{n}, 1], got "
                             f"{_core.shape_str(scale.shape)}")
        return scale.reshape(1, n), k
    if group_size is None or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size: the group strategy needs a group size dividing the "
                         f"{k} input features, got {group_size}")
    expected = (n, k // group_size)
    if scale.shape != expected:
        raise ValueError(f"weight_scale: expected shape {_core.shape_str(expected)} "
                         f"(group_size {group_size}), got {_core.shape_str(scale.shape)}")
    return scale.T, group_size


def from_compressed_tensors(tensors: Mapping, *, num_bits: int, group_size: int | None = None,
                            symmetric: bool = True, strategy: str = "group",
                            actorder: str | None = None,
                            compression_format: str = "pack-quantized",
                            block_structure=None,
                            target_bits: int | None = None, pack: bool = True,
                            exact: bool = True, permute_act_order: bool = False):
    """Imports one compressed-tensors linear layer as a `QuantizedWeight`.

    Args:
      tensors: the layer's tensors by their names under its prefix
        (``weight_packed``/``weight``, ``weight_scale``, ``weight_shape``,
        ``weight_zero_point``, ``weight_g_idx``, ``weight_global_scale``,
        ``input_scale``); numpy, JAX or torch arrays (torch float8 included).
      num_bits: 4 or 8 (``weights.num_bits`` of the config group).
      group_size: ``weights.group_size`` for the group strategies.
      symmetric: ``weights.symmetric``; False needs ``weight_zero_point``
        (int formats only: the float formats have no zero point).
      strategy: ``weights.strategy``: "group", "channel" or "tensor"; the
        float formats add "block" (fp8) and "tensor_group" (NVFP4).
      actorder: ``weights.actorder``: None, "weight" (column order on disk) or
        "group" (``weight_g_idx`` gives each input feature's group; see
        `permute_act_order`).
      compression_format: the config's ``format`` (one of `FORMATS`; others
        raise naming it). The float formats (module docstring):
        "float-quantized" (fp8), "mxfp8-quantized", "nvfp4-pack-quantized",
        "mxfp4-pack-quantized"; they return ``format`` "fp8"/"fp4" weights
        holding the checkpoint's storage.
      block_structure: ``weights.block_structure`` ``[rows, cols]`` for the
        block strategy (fp8): becomes blockwise ``B = cols``; ``in`` must be a
        multiple of ``cols``.
      target_bits, pack, exact, permute_act_order: as in `from_gptq` (int
        formats; float imports are always exact).

    Returns:
      `QuantizedWeight`, or ``(QuantizedWeight, perm)`` with `permute_act_order`.
    """
    _check_format(compression_format)
    fmt = compression_format
    if num_bits not in _BITS:
        raise ValueError(f"num_bits: expected 4 or 8, got {num_bits}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if actorder not in (None, "weight", "group", "static", "dynamic"):
        raise ValueError(f"actorder: expected None, 'weight' or 'group', got {actorder!r}")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors: expected a mapping of tensor names to arrays, got "
                        f"{type(tensors).__name__}")
    if fmt == "naive-quantized" and "weight" in tensors and \
            str(getattr(tensors["weight"], "dtype", "")).endswith("float8_e4m3fn"):
        fmt = "float-quantized"  # early FP8 checkpoints named their format naive-quantized
    if fmt in FLOAT_FORMATS:
        if permute_act_order:
            raise ValueError(f"permute_act_order: {fmt} weights are imported in column order")
        return _from_float(tensors, fmt, num_bits=num_bits, group_size=group_size,
                           symmetric=symmetric, strategy=strategy,
                           block_structure=block_structure)
    if strategy not in ("group", "channel", "tensor"):
        raise ValueError(f"strategy: {strategy!r} is a float-format strategy; {fmt} weights "
                         f"use 'group', 'channel' or 'tensor'")
    offset = 1 << (num_bits - 1)
    if fmt == "pack-quantized":
        packed = _core.check_array(_tensor(tensors, "weight_packed"), "weight_packed",
                                   dtypes=("int32",), ndim=2)
        shape = _core.to_numpy(_tensor(tensors, "weight_shape"), "weight_shape").reshape(-1)
        if shape.size != 2:
            raise ValueError(f"weight_shape: expected [out, in], got {shape.tolist()}")
        n, k = (int(d) for d in shape)
        per = 32 // num_bits
        _core.check_array(packed, "weight_packed", shape=(n, math.ceil(k / per)))
        codes = _core.unpack_words(packed, num_bits, axis=1)[:, :k].T  # [K, N], unsigned
    else:
        q = _core.check_array(_tensor(tensors, "weight"), "weight", dtypes=("int8",), ndim=2)
        n, k = q.shape
        if num_bits == 4 and (q.min() < -8 or q.max() > 7):
            raise ValueError(f"weight: 4-bit values must lie in [-8, 7], got "
                             f"[{int(q.min())}, {int(q.max())}]")
        codes = q.T.astype(np.int32) + offset
    scale = _core.check_float(_tensor(tensors, "weight_scale"), "weight_scale")
    scale_gn, group = _scale_groups(scale, strategy, n, k, group_size)
    n_groups = k // group
    zero = _tensor(tensors, "weight_zero_point", required=False)
    if symmetric:
        zeros = np.full((n_groups, n), offset, np.int32)
    else:
        if zero is None:
            raise ValueError("weight_zero_point: symmetric=False needs the layer's zero points")
        zeros = _zero_codes(zero, fmt, num_bits, n, n_groups, strategy)

    perm = None
    g_idx = _tensor(tensors, "weight_g_idx", required=False)
    if g_idx is not None:
        g_idx = _core.check_array(g_idx, "weight_g_idx", shape=(k,),
                                  dtypes=("int32", "int64")).astype(np.int64)
        if np.all(g_idx == -1):  # initialised but unused (compressed-tensors' sentinel)
            g_idx = None
    if g_idx is not None:
        perm = _core.act_order_permutation(g_idx, group, name="weight_g_idx",
                                           permute=permute_act_order)
        if perm is not None:
            codes = codes[perm]

    reference, candidates = subtract_zero_candidates(codes, zeros, scale_gn, num_bits, group)
    weight = _core.assemble(reference, candidates, group_size=group,
                            target_bits=num_bits if target_bits is None else target_bits,
                            exact=exact, pack=pack, source="compressed-tensors")
    if permute_act_order:
        return weight, (np.arange(k) if perm is None else perm)
    return weight


def _zero_codes(zero, fmt: str, bits: int, n: int, n_groups: int, strategy: str):
    """Zero points as unsigned codes ``z + 2**(bits-1)``, [G, N]."""
    offset = 1 << (bits - 1)
    if fmt == "pack-quantized" and strategy in ("group", "channel"):
        per = 32 // bits
        zero = _core.check_array(zero, "weight_zero_point", dtypes=("int32",),
                                 shape=(math.ceil(n / per), n_groups))
        return _core.unpack_words(zero, bits, axis=0)[:n].T.copy()
    zero = _core.check_array(zero, "weight_zero_point", dtypes=("int8", "int32"))
    if zero.size == 1:
        zero = np.broadcast_to(zero.reshape(1, 1), (n, n_groups))
    if zero.shape not in ((n, n_groups),):
        raise ValueError(f"weight_zero_point: expected shape {_core.shape_str((n, n_groups))}, "
                         f"got {_core.shape_str(zero.shape)}")
    lo, hi = -offset, offset - 1
    if zero.min() < lo or zero.max() > hi:
        raise ValueError(f"weight_zero_point: {bits}-bit zero points must lie in [{lo}, {hi}], "
                         f"got [{int(zero.min())}, {int(zero.max())}]")
    return zero.T.astype(np.int32) + offset


def _from_float(tensors: Mapping, fmt: str, *, num_bits: int, group_size, symmetric: bool,
                strategy: str, block_structure):
    """The float formats (fp8 / fp4 storage kept as is); arguments checked first."""
    element, bits, default_group = FLOAT_FORMATS[fmt]
    if num_bits != bits:
        raise ValueError(f"num_bits: compression_format {fmt!r} holds {bits}-bit "
                         f"{'e4m3fn' if bits == 8 else 'e2m1'} weights, got {num_bits}")
    if not symmetric:
        raise ValueError(f"symmetric: {fmt} weights are symmetric (the float formats have no "
                         f"zero point, API.md section 7), got symmetric=False")
    zero = _tensor(tensors, "weight_zero_point", required=False)
    if zero is not None and np.any(_core.to_numpy(zero, "weight_zero_point").astype(np.float32)):
        raise ValueError(f"weight_zero_point: {fmt} weights have no zero point (API.md section "
                         f"7); expected none or all zeros, got nonzero values")
    g_idx = _tensor(tensors, "weight_g_idx", required=False)
    if g_idx is not None:
        g_idx = _core.to_numpy(g_idx, "weight_g_idx")
        if not np.all(g_idx == -1):
            raise ValueError(f"weight_g_idx: act-order {fmt} weights are not supported "
                             f"(expected none, or the unused all -1 index)")
    for name in ("input_scale", "input_global_scale"):  # static activation scales: not used
        if name in tensors:
            _core.check_float(tensors[name], name)
    allowed = {"float-quantized": ("tensor", "channel", "group", "block"),
               "mxfp8-quantized": ("group",), "mxfp4-pack-quantized": ("group",),
               "nvfp4-pack-quantized": ("tensor_group", "group")}[fmt]
    if strategy not in allowed:
        raise ValueError(f"strategy: {fmt} weights use {' or '.join(map(repr, allowed))}, "
                         f"got {strategy!r}")
    if block_structure is not None and strategy != "block":
        raise ValueError(f"block_structure: only the block strategy has one, got "
                         f"{block_structure!r} with strategy {strategy!r}")
    if default_group is not None:
        if group_size is None:
            group_size = default_group
        if group_size != default_group:
            raise ValueError(f"group_size: {fmt} has groups of {default_group}, got {group_size}")

    if element == "fp8":
        w = floats.check_fp8(_tensor(tensors, "weight"), "weight")
        n, k = w.shape
    else:
        packed = _core.check_array(_tensor(tensors, "weight_packed"), "weight_packed",
                                   dtypes=("uint8",), ndim=2)
        n, k = packed.shape[0], packed.shape[1] * 2
        shape = _tensor(tensors, "weight_shape", required=False)
        if shape is not None:
            shape = [int(d) for d in _core.to_numpy(shape, "weight_shape").reshape(-1)]
            if shape != [n, k]:
                raise ValueError(f"weight_shape: weight_packed {_core.shape_str(packed.shape)} "
                                 f"holds [{n}, {k}], got {shape}")
    raw = _tensor(tensors, "weight_scale")
    if strategy in ("group", "tensor_group"):
        if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or k % group_size:
            raise ValueError(f"group_size: the {strategy} strategy needs a group size dividing "
                             f"the {k} input features, got {group_size}")
        if element == "fp4" and group_size % 2:
            raise ValueError(f"group_size: e2m1 codes pair inside a group, got {group_size}")
        expected = (n, k // group_size)
    if fmt in ("mxfp8-quantized", "mxfp4-pack-quantized"):
        exps = _core.check_array(raw, "weight_scale", dtypes=("uint8", "float8_e8m0fnu"))
        if exps.shape != expected:
            raise ValueError(f"weight_scale: expected shape {_core.shape_str(expected)} "
                             f"(in/{group_size} E8M0 exponents), got "
                             f"{_core.shape_str(exps.shape)}")
        scale = floats.e8m0_scale(exps, "weight_scale")
    elif fmt == "nvfp4-pack-quantized":
        block = floats.check_scale(raw, "weight_scale", shape=expected,
                                   dtypes=("float8_e4m3fn", "float32", "bfloat16", "float16"))
        global_scale = _tensor(tensors, "weight_global_scale", required=False)
        if global_scale is None:
            raise KeyError(f"tensors: NVFP4 needs its 'weight_global_scale' (the per-tensor "
                           f"divisor: scale = weight_scale / weight_global_scale), got keys "
                           f"{sorted(tensors)}")
        divisor = floats.scalar(global_scale, "weight_global_scale")
        scale = (block / divisor).astype(np.float32)  # one rounding, as compressed-tensors
    else:  # float-quantized
        s = floats.check_scale(raw, "weight_scale")
        if strategy == "tensor":
            if s.size != 1:
                raise ValueError(f"weight_scale: the tensor strategy has one scale, got shape "
                                 f"{_core.shape_str(s.shape)}")
            scale = np.broadcast_to(s.reshape(1, 1), (n, 1))
        elif strategy == "channel":
            if s.shape not in ((n, 1), (n,)):
                raise ValueError(f"weight_scale: the channel strategy expects shape [{n}, 1], "
                                 f"got {_core.shape_str(s.shape)}")
            scale = s.reshape(n, 1)
        elif strategy == "group":
            if s.shape != expected:
                raise ValueError(f"weight_scale: expected shape {_core.shape_str(expected)} "
                                 f"(group_size {group_size}), got {_core.shape_str(s.shape)}")
            scale = s
        else:
            if block_structure is None:
                raise ValueError("block_structure: the block strategy needs the config's "
                                 "weights.block_structure [rows, cols], got None")
            if s.ndim != 2:
                raise ValueError(f"weight_scale: the block strategy expects a 2-D scale "
                                 f"[ceil(out/rows), ceil(in/cols)], got shape "
                                 f"{_core.shape_str(s.shape)}")
            scale = floats.block_scales(s, n, k, list(block_structure), "weight_scale")
    if element == "fp8":
        return floats.fp8_weight(w, np.ascontiguousarray(scale, np.float32))
    return floats.fp4_weight(floats.unpack_pairs(packed), np.ascontiguousarray(scale))


class CompressedTensorsLayer(NamedTuple):
    """One layer in a compressed-tensors format (numpy arrays)."""

    tensors: dict
    config: dict  # the ``weights`` quantization args of its config group
    compression_format: str  # the config group's ``format``

    def config_group(self, quantize_activation: bool = False, targets=("Linear",)) -> dict:
        """The ``config_groups`` entry llm-compressor writes for this layer's scheme.

        ``input_activations``: dynamic per-token int8 (W8A8/W4A8 int), dynamic
        per-token fp8 (FP8_DYNAMIC; per token and group of ``cols`` for the
        block strategy, as FP8_BLOCK), or None (weight-only).
        """
        weights = dict(self.config)
        acts = None
        if quantize_activation:
            if weights["type"] == "int":
                acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                        "dynamic": True}
            elif weights["num_bits"] == 8:
                acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                        "dynamic": True}
                if weights["strategy"] == "block":
                    acts.update(strategy="group", group_size=weights["block_structure"][1])
            else:
                raise ValueError("quantize_activation: compressed-tensors has no scheme with "
                                 "fp4 weights and fp8 activations (NVFP4/MXFP4 activations "
                                 "are fp4); export weight-only")
        return {"targets": list(targets), "format": self.compression_format,
                "weights": weights, "input_activations": acts, "output_activations": None}


def to_compressed_tensors(qw, *, compression_format: str | None = None,
                          scale_dtype=np.float32, exact: bool = True) -> CompressedTensorsLayer:
    """Writes a `QuantizedWeight` in a compressed-tensors format.

    `compression_format` None picks by ``qw.format``: "pack-quantized" for
    int weights, "float-quantized" for fp8, and for fp4 "mxfp4-pack-quantized"
    when the blocks are 32 wide with power-of-two scales, else
    "nvfp4-pack-quantized" (blocks of 16; wider blocks or per-channel scales
    are repeated over 16-wide groups).

    Float formats (tensor names and dtypes as llm-compressor writes them):

    * ``float-quantized``: ``weight`` float8_e4m3fn ``[out, in]``,
      ``weight_scale`` (`scale_dtype`) ``[out, 1]`` (strategy "channel"), or
      for blockwise B ``[ceil(out/128), in/B]`` (strategy "block",
      block_structure ``[128, B]``) when the scales repeat over 128-row
      groups, else ``[out, in/B]`` (strategy "group").
    * ``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[out, in/2]`` (even
      index low), ``weight_scale`` float8_e4m3fn ``[out, in/16]``,
      ``weight_global_scale`` float32 ``[1]``, a divisor: a float32 divisor
      ``g`` and e4m3 block scales ``s`` with ``float32(s / g) == scale`` are
      searched for; a weight with none raises unless ``exact=False``.
    * ``mxfp4-pack-quantized``: ``weight_packed``, ``weight_scale`` uint8
      ``[out, in/32]`` E8M0 exponents (``scale = 2**(e - 127)``).

    Int formats: ``pack-quantized`` (the W4A16/W8A16 format): ``weight_packed``,
    ``weight_shape``; ``int-quantized`` (what W8A8/W4A8 checkpoints use, the
    values in an int8 ``weight``). Both with ``weight_scale`` and, with zero
    points, ``weight_zero_point``: what compressed-tensors' decompressor reads
    back to ``qw.dequantize()``. ``config`` is the ``weights`` entry of the
    config group (num_bits, type, symmetric, strategy, group_size).

    A zero point must be an integer number of scales, ``z = zero_point /
    scale`` within the signed range of ``bits`` -- true of weights imported
    from GPTQ, AWQ or compressed-tensors, not of `quantize_weight`'s
    min/max zero points, which are arbitrary floats. Those raise (naming the
    largest deviation) unless ``exact=False``, which rounds ``z``.

    Args:
      qw: the weight.
      scale_dtype: dtype of ``weight_scale`` (float32 keeps the scale exact;
        bfloat16/float16 round it, so they need ``exact=False`` unless the
        scales already are such numbers).
      exact: refuse any change to the dequantized weight.
    """
    from xla_qops.quantize import QuantizedWeight
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a xla_qops.QuantizedWeight, got {type(qw).__name__}")
    element = getattr(qw, "format", "int")
    if element != "int":
        return _to_float(qw, element, compression_format, scale_dtype, exact)
    if compression_format is None:
        compression_format = "pack-quantized"
    if compression_format not in ("pack-quantized", "int-quantized"):
        raise ValueError(f"compression_format: expected 'pack-quantized' or 'int-quantized' "
                         f"for an int weight, got {compression_format!r}")
    packed = compression_format == "pack-quantized"
    bits, n, k = qw.bits, qw.out_features, qw.in_features
    q = np.asarray(qw.int_values()).astype(np.int32)  # stored layout
    q = q.reshape(k, n).T if qw.blockwise else q  # [N, K]
    scale = np.asarray(qw.scale, np.float32)
    scale_ng = scale[:, None] if not qw.blockwise else scale.T  # [N, G]
    out_scale = scale_ng.astype(scale_dtype)
    if exact and not np.array_equal(out_scale.astype(np.float32), scale_ng):
        raise ValueError(f"scale_dtype: {np.dtype(scale_dtype).name} does not hold these "
                         f"float32 scales exactly; keep float32 or pass exact=False")
    if packed:
        tensors = {"weight_packed": _pack_words(q + (1 << (bits - 1)), bits, axis=1),
                   "weight_scale": out_scale, "weight_shape": np.array([n, k], np.int64)}
    else:
        tensors = {"weight": q.astype(np.int8), "weight_scale": out_scale}
    symmetric = qw.zero_point is None
    if not symmetric:
        zp = np.asarray(qw.zero_point, np.float32)
        zp_ng = zp[:, None] if not qw.blockwise else zp.T
        ratio = zp_ng / scale_ng
        z = np.rint(ratio)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        inexact = (scale_ng * z.astype(np.float32) != zp_ng) | (z < lo) | (z > hi)
        if exact and inexact.any():
            raise ValueError(
                f"qw: {int(inexact.sum())} of {inexact.size} zero points are not an integer "
                f"number of scales within [{lo}, {hi}] (largest deviation "
                f"{float(np.max(np.abs(ratio - z))):.3g} scales); compressed-tensors stores "
                f"integer zero points: pass exact=False to round them, or export a "
                f"symmetric weight")
        z = np.clip(z, lo, hi).astype(np.int32)
        tensors["weight_zero_point"] = (_pack_words(z + (1 << (bits - 1)), bits, axis=0)
                                        if packed else z.astype(np.int8))
    config = {"num_bits": bits, "type": "int", "symmetric": symmetric,
              "strategy": "group" if qw.blockwise else "channel",
              "group_size": qw.block_size if qw.blockwise else None,
              "dynamic": False, "observer": "minmax"}
    # C order: writers such as safetensors' numpy save take the raw buffer.
    tensors = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    return CompressedTensorsLayer(tensors=tensors, config=config,
                                  compression_format=compression_format)


def _float_config(bits: int, strategy: str, group_size=None, block_structure=None,
                  scale_dtype: str | None = None) -> dict:
    """The ``weights`` QuantizationArgs of a float scheme, as llm-compressor dumps them."""
    config = {"num_bits": bits, "type": "float", "symmetric": True, "group_size": group_size,
              "strategy": strategy, "block_structure": block_structure, "dynamic": False,
              "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    if scale_dtype is not None:
        config.update(scale_dtype=scale_dtype, zp_dtype=scale_dtype)
    return config


def stored_values(qw):
    """(fp8 values float8_e4m3fn, or fp4 codes uint8) ``[out, in]`` and scales ``[out, G]``
    of a float `QuantizedWeight`, read off its storage (no dequantization)."""
    n, k = qw.out_features, qw.in_features
    w = np.array(qw.w)  # a writable copy
    if qw.format == "fp4":
        if qw.blockwise:  # [G, B/2, N] -> [G, N, B] -> [N, K]
            w = floats.unpack_pairs(w.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(n, k)
        else:
            w = floats.unpack_pairs(w)
    elif qw.blockwise:
        w = w.reshape(k, n).T
    scale = np.array(qw.scale, np.float32)
    return np.ascontiguousarray(w), np.ascontiguousarray(scale.T if qw.blockwise
                                                         else scale[:, None])


def _to_float(qw, element: str, fmt, scale_dtype, exact: bool) -> CompressedTensorsLayer:
    allowed = ("float-quantized",) if element == "fp8" else (
        "nvfp4-pack-quantized", "mxfp4-pack-quantized")
    if fmt is not None and fmt not in allowed:
        raise ValueError(f"compression_format: a {element} weight is written as "
                         f"{' or '.join(map(repr, allowed))}, got {fmt!r}")
    if qw.zero_point is not None:
        raise ValueError(f"qw: a {element} weight has no zero point (API.md section 7)")
    values, scale_ng = stored_values(qw)
    n, k = values.shape
    if element == "fp8":
        out = scale_ng.astype(scale_dtype)
        if exact and not np.array_equal(out.astype(np.float32), scale_ng):
            raise ValueError(f"scale_dtype: {np.dtype(scale_dtype).name} does not hold these "
                             f"float32 scales exactly; keep float32 or pass exact=False")
        if not qw.blockwise:
            config = _float_config(8, "channel")
        else:
            rows, b = 128, qw.block_size
            tops = out[::rows]  # the first row of each 128-row block
            if np.array_equal(np.repeat(tops, rows, axis=0)[:n], out):
                out = tops
                config = _float_config(8, "block", block_structure=[rows, b])
            else:
                config = _float_config(8, "group", group_size=b)
        tensors = {"weight": values, "weight_scale": out}
        return CompressedTensorsLayer(
            tensors={name: np.ascontiguousarray(a) for name, a in tensors.items()},
            config=config, compression_format="float-quantized")
    block = k if not qw.blockwise else qw.block_size
    mx_ok = block == 32 and _mx_exponents(scale_ng) is not None
    if fmt is None:
        fmt = "mxfp4-pack-quantized" if mx_ok else "nvfp4-pack-quantized"
    packed = floats.pack_pairs(values)
    if fmt == "mxfp4-pack-quantized":
        if block != 32:
            raise ValueError(f"qw: mxfp4-pack-quantized has blocks of 32, got block_size "
                             f"{qw.block_size}")
        exps = _mx_exponents(scale_ng)
        if exps is None:
            raise ValueError("qw: mxfp4-pack-quantized scales are powers of two 2**(e - 127), "
                             "e in [0, 254]; these scales are not (export nvfp4-pack-quantized)")
        return CompressedTensorsLayer(
            tensors={"weight_packed": packed, "weight_scale": exps},
            config=_float_config(4, "group", group_size=32, scale_dtype="torch.uint8"),
            compression_format=fmt)
    if block % 16:
        raise ValueError(f"qw: nvfp4-pack-quantized has groups of 16, and the weight's blocks "
                         f"of {block} are not a multiple")
    scale16 = np.repeat(scale_ng, block // 16, axis=1)
    block_scale, divisor, n_bad = _nvfp4_scales(scale16)
    if n_bad and exact:
        raise ValueError(f"qw: {n_bad} of {scale16.size} block scales are not float32(s / g) "
                         f"for e4m3 s and one float32 g (NVFP4's divisor form); pass "
                         f"exact=False to round them")
    return CompressedTensorsLayer(
        tensors={"weight_packed": packed, "weight_scale": block_scale,
                 "weight_global_scale": np.array([divisor], np.float32)},
        config=_float_config(4, "tensor_group", group_size=16,
                             scale_dtype="torch.float8_e4m3fn"),
        compression_format=fmt)


def _mx_exponents(scale: np.ndarray):
    """uint8 E8M0 exponents of power-of-two scales, or None if one is not."""
    mantissa, exponent = np.frexp(scale.astype(np.float64))
    e = exponent.astype(np.int64) - 1 + 127  # scale = 0.5 * 2**exponent
    if not (np.all(mantissa == 0.5) and np.all((e >= 0) & (e <= 254))):
        return None
    return e.astype(np.uint8)


def _e4m3(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -448.0, 448.0).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)


def _nvfp4_scales(scale: np.ndarray):
    """(e4m3 block scales, float32 divisor g, mismatches) with float32(s / g) == scale.

    The largest block scale is ``float32(v / g)`` for some e4m3 ``v`` (448 in
    every NVFP4 quantizer, so it is tried first), which leaves few candidates
    for ``g``: ``v / max(scale)`` for each e4m3 ``v`` and their float32
    neighbours. For each, every block takes the e4m3 value nearest
    ``scale * g`` or one of its two neighbours, whichever reproduces its
    scale; candidates are screened on the distinct scale values first. The
    first ``g`` with no mismatch wins, else the one with fewest.
    """
    scale = np.ascontiguousarray(scale, np.float32)
    if np.any(scale < 0):
        raise ValueError("qw: NVFP4 block scales are non-negative")
    top = np.float32(scale.max()) if scale.size else np.float32(0)
    if top == 0:
        return np.zeros(scale.shape, ml_dtypes.float8_e4m3fn), np.float32(1), 0
    distinct = np.unique(scale)

    def fit(values, g):
        nearest = _e4m3(values * g).view(np.uint8)
        chosen = nearest.copy()
        ok = np.zeros(values.shape, bool)
        for step in (0, 1, -1):
            trial = np.clip(nearest.astype(np.int16) + step, 0, 0x7E).astype(np.uint8)
            back = (trial.view(ml_dtypes.float8_e4m3fn).astype(np.float32) / g).astype(
                np.float32)
            hit = ~ok & (back == values)
            chosen[hit] = trial[hit]
            ok |= hit
        return chosen, int((~ok).sum())

    e4m3 = np.arange(1, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    best = None
    for v in e4m3[::-1]:  # 448 first, then downwards
        base = np.float32(np.float32(v) / top)
        candidates = [base]
        up = down = base
        for _ in range(3):
            up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
            candidates += [up, down]
        for g in candidates:
            if not (np.isfinite(g) and g > 0):
                continue
            if fit(distinct, g)[1] and best is not None:
                continue
            chosen, n_bad = fit(scale, g)
            if best is None or n_bad < best[2]:
                best = (chosen.view(ml_dtypes.float8_e4m3fn), g, n_bad)
            if n_bad == 0:
                return best
    return best


def _pack_words(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned `bits`-wide codes packed into int32 words along `axis` (zero-padded)."""
    per = 32 // bits
    codes = np.moveaxis(codes.astype(np.uint32), axis, -1)
    pad = -codes.shape[-1] % per
    codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    fields = codes.reshape(*codes.shape[:-1], -1, per)
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
    words = np.bitwise_or.reduce(fields << shifts, axis=-1)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


def scheme_args(config: Mapping, group_name: str | None = None) -> dict:
    """The importer's keywords and ``quantize_activation`` for one config group.

    `config` is ``quantization_config`` from a checkpoint's ``config.json``.
    Returns ``{"importer": {...from_compressed_tensors keywords...},
    "quantize_activation": bool, "targets": [...], "ignore": [...]}``.

    Raises:
      ValueError: not compressed-tensors, an unknown group, a format or
        activation scheme this project does not run.
    """
    if config.get("quant_method") != "compressed-tensors":
        raise ValueError(f"config: expected quant_method 'compressed-tensors', got "
                         f"{config.get('quant_method')!r}")
    groups = config.get("config_groups") or {}
    if not groups:
        raise ValueError("config: no config_groups")
    if group_name is None:
        if len(groups) != 1:
            raise ValueError(f"group_name: the config has groups {sorted(groups)}; name one")
        group_name = next(iter(groups))
    if group_name not in groups:
        raise ValueError(f"group_name: expected one of {sorted(groups)}, got {group_name!r}")
    group = groups[group_name]
    fmt = group.get("format") or config.get("format")
    _check_format(fmt)
    weights = group.get("weights") or {}
    kind = weights.get("type", "int")
    if kind not in ("int", "float"):
        raise ValueError(f"config: weights of type {kind!r}; expected 'int' or 'float'")
    if kind == "float" and fmt == "naive-quantized":
        fmt = "float-quantized"  # early FP8 checkpoints named their format naive-quantized
    if (kind == "float") != (fmt in FLOAT_FORMATS):
        raise ValueError(f"config: weights of type {kind!r} do not go with format {fmt!r}")
    acts = group.get("input_activations")
    quantize_activation = False
    if acts:
        quantize_activation = True
        if kind == "int" and not (
                acts.get("type", "int") == "int" and acts.get("num_bits") == 8
                and acts.get("dynamic") and acts.get("strategy") == "token"
                and acts.get("symmetric", True)):
            raise ValueError(f"config: input_activations {dict(acts)} are not dynamic "
                             f"symmetric per-token int8, the only activation quantization "
                             f"quantized_matmul does with int weights")
        if kind == "float" and not (acts.get("type") == "float"
                                    and acts.get("num_bits") in (4, 8)
                                    and acts.get("symmetric", True)):
            raise ValueError(f"config: input_activations {dict(acts)} are not symmetric fp8 "
                             f"or fp4; quantized_matmul quantizes activations of float "
                             f"weights to fp8 per token")
        # Float weights: static per-tensor fp8 (an input_scale), dynamic per-token or
        # per-group fp8, and NVFP4/MXFP4's fp4 activations all run as dynamic per-token
        # (and block) fp8 activations (API.md section 7; docs/interop.md).
    importer = dict(num_bits=weights.get("num_bits"), group_size=weights.get("group_size"),
                    symmetric=weights.get("symmetric", True),
                    strategy=weights.get("strategy", "group"),
                    actorder=weights.get("actorder"), compression_format=fmt)
    if weights.get("block_structure") is not None:
        importer["block_structure"] = list(weights["block_structure"])
    return {"importer": importer, "quantize_activation": quantize_activation,
            "targets": list(group.get("targets") or []), "ignore": list(config.get("ignore") or [])}
