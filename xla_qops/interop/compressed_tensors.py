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

Dynamic per-token int8 activations (``input_activations`` with
``dynamic: true``, ``strategy: "token"``; the W8A8 and W4A8 schemes) are
``quantize_activation=True`` in `xla_qops.quantized_matmul`; the weight
importer does not need them (`scheme_args` reads them from the config).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import numpy as np

from xla_qops.interop import _core
from xla_qops.interop.gptq import subtract_zero_candidates

# What this module reads; every other compressed-tensors format is refused by name.
FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
_OTHER_FORMATS = ("dense", "float-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized",
                  "mxfp8-quantized", "sparse-bitmask", "sparse-24-bitmask", "marlin-24",
                  "mixed-precision")
STRATEGIES = ("group", "channel", "tensor")
_BITS = (4, 8)


def _check_format(fmt: str) -> None:
    if fmt in FORMATS:
        return
    what = ("a compressed-tensors format this importer does not read (float or "
            "sparse weights have no int4/int8 form in API.md's convention)"
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
                            target_bits: int | None = None, pack: bool = True,
                            exact: bool = True, permute_act_order: bool = False):
    """Imports one compressed-tensors linear layer as a `QuantizedWeight`.

    Args:
      tensors: the layer's tensors by their names under its prefix
        (``weight_packed``/``weight``, ``weight_scale``, ``weight_shape``,
        ``weight_zero_point``, ``weight_g_idx``); numpy, JAX or torch arrays.
      num_bits: 4 or 8 (``weights.num_bits`` of the config group).
      group_size: ``weights.group_size`` for the group strategy.
      symmetric: ``weights.symmetric``; False needs ``weight_zero_point``.
      strategy: ``weights.strategy``: "group", "channel" or "tensor".
      actorder: ``weights.actorder``: None, "weight" (column order on disk) or
        "group" (``weight_g_idx`` gives each input feature's group; see
        `permute_act_order`).
      compression_format: the config's ``format`` (one of `FORMATS`; others
        raise naming it).
      target_bits, pack, exact, permute_act_order: as in `from_gptq`.

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


class CompressedTensorsLayer(NamedTuple):
    """One layer in a compressed-tensors format (numpy arrays)."""

    tensors: dict
    config: dict  # the ``weights`` quantization args of its config group
    compression_format: str  # the config group's ``format``


def to_compressed_tensors(qw, *, compression_format: str = "pack-quantized",
                          scale_dtype=np.float32, exact: bool = True) -> CompressedTensorsLayer:
    """Writes a `QuantizedWeight` in a compressed-tensors format.

    ``pack-quantized`` (the W4A16/W8A16 format): ``weight_packed``,
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
    if compression_format not in ("pack-quantized", "int-quantized"):
        raise ValueError(f"compression_format: expected 'pack-quantized' or 'int-quantized', "
                         f"got {compression_format!r}")
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
    if weights.get("type", "int") != "int":
        raise ValueError(f"config: weights of type {weights.get('type')!r}; only int weights "
                         f"map onto API.md's convention")
    acts = group.get("input_activations")
    quantize_activation = False
    if acts:
        if not (acts.get("type", "int") == "int" and acts.get("num_bits") == 8
                and acts.get("dynamic") and acts.get("strategy") == "token"
                and acts.get("symmetric", True)):
            raise ValueError(f"config: input_activations {dict(acts)} are not dynamic "
                             f"symmetric per-token int8, the only activation quantization "
                             f"quantized_matmul does")
        quantize_activation = True
    importer = dict(num_bits=weights.get("num_bits"), group_size=weights.get("group_size"),
                    symmetric=weights.get("symmetric", True),
                    strategy=weights.get("strategy", "group"),
                    actorder=weights.get("actorder"), compression_format=fmt)
    return {"importer": importer, "quantize_activation": quantize_activation,
            "targets": list(group.get("targets") or []), "ignore": list(config.get("ignore") or [])}
