"""GGUF (llama.cpp): ggml's quantized block formats in, one tensor or a whole file.

A quantized ggml tensor of ``N`` rows (output features) and ``K`` columns
(input features) is stored row by row, each row as ``K / block`` blocks of
fixed size; a block holds its own scale (and min) as float16 and the codes.
The layouts read here (ggml-common.h; ``u`` unsigned codes, ``q`` signed):

| type | values/block | bytes | layout | value |
|---|---|---|---|---|
| Q8_0 | 32 | 34 | ``d`` f16, 32 × int8 ``q`` | ``d · q`` |
| Q4_0 | 32 | 18 | ``d`` f16, 16 bytes: low nibbles values 0–15, high nibbles 16–31 | ``d · (u − 8)`` |
| Q4_1 | 32 | 20 | ``d``, ``m`` f16, nibbles as Q4_0 | ``d · u + m`` |
| Q5_0 | 32 | 22 | ``d`` f16, ``qh`` u32 (bit i: value i's fifth bit), nibbles as Q4_0 | ``d · (u − 16)`` |
| Q5_1 | 32 | 24 | ``d``, ``m`` f16, ``qh``, nibbles | ``d · u + m`` |
| Q4_K | 256 | 144 | ``d``, ``dmin`` f16; 12 bytes of 6-bit scales ``sc`` and mins ``m`` for 8 sub-blocks of 32; 128 bytes: byte ``32c + l`` holds sub-block ``2c`` value ``l`` (low nibble) and ``2c + 1`` value ``l`` (high) | ``d·sc · u − dmin·m`` |
| Q6_K | 256 | 210 | 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 × int8 scales for sub-blocks of 16, ``d`` f16 | ``d·sc · (u − 32)`` |

Mapping onto API.md's ``scale · q − zero_point`` (the block or sub-block is
the quantization block ``B``): Q8_0, Q4_0, Q5_0 and Q6_K have no zero point
(``q`` signed as stored, ``scale = d`` or ``d·sc``). Q4_1 and Q4_K have a
min: as int4, ``q = u − 8`` and ``zero_point = −(m + 8d)`` (Q4_1) or
``dmin·m − 8·d·sc`` (Q4_K), exact when that sum is a float32 number; as int8
(``target_bits=8``), ``q = u`` in [0, 15] and ``zero_point = −m`` or
``dmin·m``, always exact. Q5_0/Q5_1/Q6_K become int8 (5 and 6 bits do not
fit int4). The reference every import is checked against, bit for bit, is
the `gguf` package's own dequantization (``gguf.quants.dequantize``, float32
numpy), so "exact" means: equal to what llama.cpp's Python tooling computes.

The float types become fp4 weights (API.md section 7, ``format`` "fp4"), the
e2m1 codes kept and re-paired along ``in`` (even index low):

| type | values/block | bytes | layout | value |
|---|---|---|---|---|
| MXFP4 | 32 | 17 | ``e`` uint8 (E8M0), 16 bytes: low nibbles values 0–15, high nibbles 16–31 | ``e2m1(code) · 2^(e−127)`` |
| NVFP4 | 64 | 36 | 4 × ``d`` unsigned e4m3 (one per 16 values), then per 16 values 8 bytes: low nibbles 0–7, high 8–15 | ``e2m1(code) · ue4m3(d)`` |

gguf-py stores these values doubled (``kvalues`` 0, 1, 2, 3, 4, 6, 8, 12 and a
halved scale); the product is the same number. Its code 8 is +0 (ours, -0
in e2m1) and is imported as code 0, so even the sign of zero matches. MXFP4
``e = 255`` (E8M0's NaN) is refused.

Other ggml types (Q2_K, Q3_K, Q5_K, the IQ and ternary types) raise,
naming the type.
"""

from __future__ import annotations

import struct

import numpy as np

from xla_qops.interop import _core

# type name -> (values per block, default target bits)
TYPES = {"Q8_0": (32, 8), "Q4_0": (32, 4), "Q4_1": (32, 4), "Q5_0": (32, 8),
         "Q5_1": (32, 8), "Q4_K": (32, 4), "Q6_K": (16, 8)}
_UNQUANTIZED = ("F32", "F16", "BF16", "F64")
# fp4 types -> their scale block (the QuantizedWeight's block_size)
FLOAT_TYPES = {"MXFP4": 32, "NVFP4": 16}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the test environments have it
        raise ImportError("GGUF support needs the gguf package (llama.cpp's gguf-py): "
                          "pip install 'xla-qops[gguf]' or pip install gguf") from e
    return gguf


def _type_name(ggml_type) -> str:
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType(ggml_type).name if not isinstance(ggml_type, str) \
            else gguf.GGMLQuantizationType[ggml_type.upper()].name
    except (KeyError, ValueError):
        raise ValueError(f"ggml_type: {ggml_type!r} is not a ggml type") from None


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 [n_blocks]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16)[:, 0].astype(
        np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per row -> 32 values: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian u32) per row -> bit i of it for i in 0..31."""
    words = np.ascontiguousarray(qh).view("<u4")[:, 0]
    return ((words[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)


def _decode(name: str, blocks: np.ndarray):
    """(codes [n, values], unsigned or signed; scale [n, sub]; min [n, sub] or None;
    offset) per block, where value = scale · (code − offset) + min per sub-block.

    `offset` is the constant the format subtracts from its codes (0 if the
    codes are stored signed); `min` is the additive term (``m`` or ``−dmin·m``).
    """
    n = blocks.shape[0]
    if name == "Q8_0":
        q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.int32)
        return q, _f16(blocks, 0)[:, None], None, 0
    if name in ("Q4_0", "Q4_1"):
        has_min = name == "Q4_1"
        u = _nibbles(blocks[:, 4 if has_min else 2:])
        minimum = _f16(blocks, 2)[:, None] if has_min else None
        return u, _f16(blocks, 0)[:, None], minimum, 0 if has_min else 8
    if name in ("Q5_0", "Q5_1"):
        has_min = name == "Q5_1"
        start = 4 if has_min else 2
        u = _nibbles(blocks[:, start + 4:]) | (_fifth_bits(blocks[:, start:start + 4]) << 4)
        minimum = _f16(blocks, 2)[:, None] if has_min else None
        return u, _f16(blocks, 0)[:, None], minimum, 0 if has_min else 16
    if name == "Q4_K":
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = (a.astype(np.float32) for a in _gguf().quants.Q4_K.get_scale_min(
            np.ascontiguousarray(blocks[:, 4:16])))
        qs = blocks[:, 16:].reshape(n, 4, 32)  # chunk c: sub-blocks 2c (low), 2c + 1 (high)
        u = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 256).astype(np.int32)
        # float32 products of a float16 and a 6-bit integer: exact.
        return u, d[:, None] * sc, -(dmin[:, None] * m), 0
    if name == "Q6_K":
        ql, qh = blocks[:, :128].reshape(n, 2, 64), blocks[:, 128:192].reshape(n, 2, 32)
        low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 128)  # [half, 4 x 32]
        high = np.stack([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=2).reshape(n, 2, 128)
        u = (low | (high << 4)).reshape(n, 256).astype(np.int32)
        sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
        return u, _f16(blocks, 208)[:, None] * sc, None, 32
    raise AssertionError(name)


def from_gguf(data, ggml_type, shape, *, target_bits: int | None = None, pack: bool = True,
              exact: bool = True):
    """Imports one quantized ggml tensor as a `QuantizedWeight`.

    Args:
      data: the tensor's raw blocks, uint8 (any shape holding ``N · K / block``
        blocks in row order; a `gguf.GGUFReader` tensor's ``data`` as is).
      ggml_type: a `gguf.GGMLQuantizationType`, its value or its name ("Q4_K").
      shape: ``(N, K)`` = (out, in), numpy order (a GGUF tensor's ``shape``
        lists the dimensions the other way round, ``(K, N)``).
      target_bits: 4 or 8 (default: 4 for Q4_0/Q4_1/Q4_K, 8 otherwise; 4 is
        refused for Q5_*/Q6_K/Q8_0). MXFP4/NVFP4 import as fp4 weights
        (``format`` "fp4"; `target_bits` None or 4).
      pack, exact: as for the other importers.
    """
    name = _type_name(ggml_type)
    if name not in TYPES and name not in FLOAT_TYPES:
        kind = "unquantized (read it as an array)" if name in _UNQUANTIZED else \
            "a ggml type with no int4/int8/fp4 form here"
        raise ValueError(f"ggml_type: {name} is {kind}; expected one of "
                         f"{', '.join([*TYPES, *FLOAT_TYPES])}")
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[name]
    values, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape: expected (out, in), got {tuple(shape)}")
    n, k = (int(d) for d in shape)
    if k % values:
        raise ValueError(f"shape: {name} rows hold whole blocks of {values} values; "
                         f"in={k} is not a multiple")
    raw = _core.check_array(data, "data", dtypes=("uint8", "int8"))
    expected = n * (k // values) * type_size
    if raw.size != expected:
        raise ValueError(f"data: {name} [{n}, {k}] takes {expected} bytes, got {raw.size}")
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, type_size)
    if name in FLOAT_TYPES:
        if target_bits not in (None, 4):
            raise ValueError(f"target_bits: {name} imports as fp4 (4-bit), got {target_bits}")
        if not pack:
            raise ValueError(f"pack: {name} imports as fp4, stored packed only; got pack=False")
        return _from_fp4(name, blocks, n, k, gguf, qtype)
    codes, scale, minimum, offset = _decode(name, blocks)
    block = TYPES[name][0]
    g = k // block  # quantization blocks per row
    # [n * K / values, values] -> [N, K] codes and [N, G] parameters -> [K, N] / [G, N].
    codes_kn = codes.reshape(n, k).T
    scale_gn = scale.reshape(n, g).T
    min_gn = None if minimum is None else minimum.reshape(n, g).T
    reference = gguf.quants.dequantize(blocks.reshape(n, -1), qtype).astype(np.float32).T
    candidates = _candidates(codes_kn, scale_gn, min_gn, offset, four_bit=TYPES[name][1] == 4)
    bits = TYPES[name][1] if target_bits is None else target_bits
    return _core.assemble(reference, candidates, group_size=block, target_bits=bits,
                          exact=exact, pack=pack, source=f"GGUF {name}")


def _ue4m3(d: np.ndarray) -> np.ndarray:
    """gguf-py's unsigned e4m3 block scale (without its 0.5 factor), float32.

    Bit 7 is ignored; 0x00 and 0x7F decode to 0 (as `gguf.quants.NVFP4`)."""
    exp = ((d >> 3) & 0xF).astype(np.int32)
    man = (d & 0x7).astype(np.float64)
    raw = np.where(exp == 0, man * 2.0 ** -9, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    return np.where((d == 0) | (d == 0x7F), 0.0, raw).astype(np.float32)


def _from_fp4(name: str, blocks: np.ndarray, n: int, k: int, gguf, qtype):
    """MXFP4 / NVFP4 blocks -> fp4 `QuantizedWeight`, checked against gguf-py."""
    from xla_qops.interop import floats
    if name == "MXFP4":
        qs = blocks[:, 1:]
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [blocks, 32]
        scale = floats.e8m0_scale(np.ascontiguousarray(blocks[:, 0]), "data")
    else:
        scale = _ue4m3(blocks[:, :4]).reshape(-1)  # [blocks * 4]
        qs = blocks[:, 4:].reshape(-1, 4, 8)
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [blocks, 4, 16]
    block = FLOAT_TYPES[name]
    codes = codes.reshape(n, k).astype(np.uint8)
    codes[codes == 8] = 0  # gguf's code 8 is +0
    scale_ng = scale.reshape(n, k // block)
    with np.errstate(over="ignore"):  # huge E8M0 exponents overflow in gguf-py too
        ours = (floats.e2m1_values(codes).reshape(n, -1, block)
                * scale_ng[..., None]).reshape(n, k)
        reference = gguf.quants.dequantize(blocks.reshape(n, -1), qtype).astype(np.float32)
    bad = (ours != reference) & ~(np.isnan(ours) & np.isnan(reference))
    if bad.any():  # pragma: no cover - the layouts above are gguf-py's
        raise ValueError(f"GGUF {name}: {int(bad.sum())} of {bad.size} weights differ from "
                         f"gguf-py's dequantization")
    return floats.fp4_weight(codes, scale_ng)


def _candidates(codes, scale, minimum, offset: int, four_bit: bool) -> dict:
    """Encodings of ``scale · (codes − offset) + minimum`` per block; int4 only
    for the 4-bit formats."""
    if minimum is None:
        q = codes - offset
        out = {8: lambda: _core.Encoding(bits=8, q=q, scale=scale, zero_point=None)}
        if four_bit:
            out[4] = lambda: _core.Encoding(bits=4, q=q, scale=scale, zero_point=None)
        return out
    out = {8: lambda: _core.Encoding(bits=8, q=codes, scale=scale, zero_point=-minimum)}
    if four_bit:
        # q = u - 8: scale * (q + 8) + min = scale * q - (-(min + 8 * scale)).
        zero = -(minimum.astype(np.float64) + 8.0 * scale.astype(np.float64))
        out[4] = lambda: _core.Encoding(bits=4, q=codes - 8, scale=scale,
                                        zero_point=zero.astype(np.float32))
    return out


def read_gguf(path, *, dequantize_unsupported: bool = False):
    """Every tensor of a ``.gguf`` file: ``(weights, others, metadata)``.

    ``weights``: tensor name -> `QuantizedWeight` for the 2-D tensors of a
    type in `TYPES` (their default target width). ``others``: every
    unquantized tensor (F32/F16/BF16) as a numpy array in numpy order, and,
    with `dequantize_unsupported`, other quantized types dequantized to
    float32 (otherwise they raise, listing every such tensor). ``metadata``:
    the file's key-value fields (strings and numbers; arrays as lists).

    Tensor names are GGUF's (``blk.0.attn_q.weight``); llama.cpp's converter
    permutes Llama's q/k projection rows for its rotary layout, which matters
    when mapping them back onto a transformers model.
    """
    gguf = _gguf()
    # The file may come from anyone: gguf-py's reader (a memory map; it checks
    # little) fails on a truncated or lying file with whatever numpy or
    # struct raises, and a tensor whose data runs past the end comes back
    # short. Each becomes a ValueError naming the file (and the tensor).
    try:
        reader = gguf.GGUFReader(path)
        tensors = list(reader.tensors)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error,
            MemoryError) as e:
        raise ValueError(f"path: {path} is not a readable GGUF file "
                         f"({type(e).__name__}: {e})") from None
    weights, others, unsupported = {}, {}, []
    for t in tensors:
        try:
            name = t.tensor_type.name
            shape = tuple(int(d) for d in reversed(t.shape))
            if name in _UNQUANTIZED:
                array = np.asarray(t.data)
                if name == "BF16":
                    import ml_dtypes  # ships with jax
                    array = array.view(ml_dtypes.bfloat16)
                others[t.name] = array.reshape(shape)
            elif (name in TYPES or name in FLOAT_TYPES) and len(shape) == 2:
                weights[t.name] = from_gguf(t.data, t.tensor_type, shape)
            elif dequantize_unsupported:
                others[t.name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type
                                                        ).reshape(shape)
            else:
                unsupported.append(f"{t.name} ({name}, shape {list(shape)})")
        except (ValueError, IndexError, TypeError, OverflowError) as e:
            raise ValueError(f"path: {path}: tensor {t.name!r}: {e}") from e
    if unsupported:
        raise ValueError(f"path: {path}: {len(unsupported)} tensors of types with no "
                         f"int4/int8 form here: {', '.join(unsupported[:8])}"
                         f"{' ...' if len(unsupported) > 8 else ''}; pass "
                         f"dequantize_unsupported=True to get them as float32")
    metadata = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        try:
            metadata[field.name] = field.contents()
        except Exception:  # noqa: BLE001 - a field type this gguf version cannot decode
            continue
    return weights, others, metadata
