"""Whole quantized checkpoints from other tools: GPTQ, AWQ, compressed-tensors, fp8, ModelOpt.

`read_checkpoint(source)` takes what a user downloads -- a directory with
``config.json`` and one or more ``*.safetensors`` files, or a single
``.safetensors`` file -- and returns every quantized linear layer as a
`QuantizedWeight` keyed by its module path, whether it quantizes
activations, and every other tensor under its own name.

The format comes from ``config.json``'s ``quantization_config.quant_method``
("gptq", "awq", "compressed-tensors" -- int or float formats --, "fp8" with
``weight_block_size`` for native fp8 checkpoints such as DeepSeek-V3,
"modelopt" with ``quant_algo`` "NVFP4"/"FP8", also read from ModelOpt's
``hf_quant_config.json``), else from the tensor names (``.qweight`` GPTQ or
AWQ by their shapes, ``.weight_packed`` compressed-tensors,
``.weight_scale_inv`` native fp8), else it must be given (``format=``). The
layer parameters (bits, group size, GPTQ version, compressed-tensors config
groups, fp8 block) come from the config; without one they are read off the
tensor shapes and dtypes. Safetensors files are read here (float8, bfloat16
and the other dtypes numpy lacks come back as ml_dtypes arrays).
`torch_bridge.load_quantized` and `xla_qops.checkpoint.load_quantized`
build on this.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Mapping

import ml_dtypes
import numpy as np

from xla_qops.interop.awq import from_awq
from xla_qops.interop.compressed_tensors import from_compressed_tensors, scheme_args
from xla_qops.interop.floats import from_fp8_blocks, from_modelopt
from xla_qops.interop.gptq import from_gptq
from xla_qops.interop.state_dict import layer_tensors
from xla_qops.quantize import QuantizedWeight

FORMATS = ("gptq", "awq", "compressed-tensors", "fp8", "modelopt")


@dataclasses.dataclass
class ImportedCheckpoint:
    """A foreign checkpoint converted: what `read_checkpoint` returns."""

    format: str
    weights: dict[str, QuantizedWeight]  # module path -> weight
    quantize_activation: dict[str, bool]  # module path -> W8A8/W4A8
    tensors: dict[str, np.ndarray]  # every other tensor, by its checkpoint name
    config: dict  # quantization_config ({} without config.json)


def _files(source) -> tuple[list[str], dict]:
    """(safetensors files, quantization_config) of a directory or a file."""
    source = os.fspath(source)
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.safetensors")))
        config_path = os.path.join(source, "config.json")
        if not files:
            raise FileNotFoundError(f"source: no .safetensors files in {source}")
    elif os.path.isfile(source):
        files, config_path = [source], os.path.join(os.path.dirname(source), "config.json")
    else:
        raise FileNotFoundError(f"source: {source} is neither a directory nor a file")
    config = {}
    if os.path.isfile(config_path):
        config = _json_section(config_path, "quantization_config")
    if config.get("quant_method") == "modelopt" and isinstance(config.get("quantization"), dict):
        config = {**config, **config["quantization"]}
    modelopt_path = os.path.join(os.path.dirname(config_path), "hf_quant_config.json")
    if not config and os.path.isfile(modelopt_path):  # ModelOpt's own export
        config = {"quant_method": "modelopt", **_json_section(modelopt_path, "quantization")}
    return files, config


def _json_section(path: str, key: str) -> dict:
    """The object under `key` of a JSON file ({} when absent); ValueError naming
    the file when it is not JSON or not of that form."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"source: {path} is not valid JSON ({e})") from None
    section = document.get(key) if isinstance(document, dict) else None
    if not isinstance(document, dict) or not isinstance(section, (dict, type(None))):
        raise ValueError(f"source: {path}: expected a JSON object with an object {key!r}")
    return section or {}


# safetensors dtype -> numpy dtype (ml_dtypes for those numpy lacks)
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu, "I64": np.int64, "U64": np.uint64, "I32": np.int32,
    "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_}


def safetensors_header(path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, offset of the data) of a ``.safetensors`` file.

    The one place a safetensors header is validated, before any tensor is
    read, since the file may come from anyone: the header length within the
    file, JSON of the documented form, known dtypes, non-negative shapes whose
    byte size (Python ints: no overflow) equals the entry's data_offsets,
    entries inside the data, not overlapping and covering it (a truncated
    file fails here). Raises ValueError naming the file, and the tensor
    where one entry is wrong; allocates no more than the header's bytes.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)

    def bad(what):
        return ValueError(f"source: {path} is not a valid safetensors file: {what}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = np.frombuffer(head, "<u8")
        if int(length) > size - 8:
            raise bad(f"the header length {int(length)} runs past the end of the file "
                      f"({size} bytes)")
        try:
            header = json.loads(f.read(int(length)))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not an object of strings")
    data_start, data_size = 8 + int(length), size - 8 - int(length)
    spans = []
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise bad(f"{where}: expected an object with dtype, shape and data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(f"source: tensor {name!r} in {path} has dtype "
                             f"{entry.get('dtype')}, which this reader does not know")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(
                type(d) is int and d >= 0 for d in shape)):
            raise bad(f"{where}: shape {shape!r} is not a list of non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"{where}: data_offsets {offsets!r} are not a [start, end] inside the "
                      f"{data_size} bytes of data")
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"{where}: shape {shape} of {entry['dtype']} is {nbytes} bytes, "
                      f"data_offsets {offsets} hold {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise bad(f"tensor {name!r}: its data starts at {start}, "
                      + ("overlapping the tensor before" if start < end
                         else f"leaving bytes {end}..{start} unused"))
        end = stop
    if end != data_size:
        raise bad(f"the tensors end at byte {end} of {data_size} bytes of data "
                  "(truncated, or bytes after the last tensor)")
    return header, metadata, data_start


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as numpy (float8/bf16 via ml_dtypes).

    Reads the format directly (an 8-byte little-endian header length, a JSON
    header of dtype/shape/data_offsets, the raw little-endian data), since
    safetensors' numpy loader has no float8 or bfloat16, after
    `safetensors_header` has validated the header against the file.
    """
    return read_safetensors_with_metadata(path)[0]


def read_safetensors_with_metadata(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(`read_safetensors`, the file's ``__metadata__``)."""
    header, metadata, data_start = safetensors_header(path)
    with open(path, "rb") as f:
        f.seek(data_start)
        data = np.fromfile(f, np.uint8)
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        # Little-endian data on a little-endian host (x86-64, aarch64).
        tensors[name] = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(
            info["shape"])
    return tensors, metadata


def _load_tensors(files) -> dict[str, np.ndarray]:
    tensors = {}
    for path in files:
        for name, a in read_safetensors(path).items():
            if name in tensors:
                raise ValueError(f"source: tensor {name!r} appears in more than one file")
            tensors[name] = a
    return tensors


def detect_format(tensors: Mapping, config: Mapping) -> str:
    """The checkpoint's format: from the config, else from its tensor names and shapes."""
    method = config.get("quant_method")
    if method is not None:
        if method not in FORMATS:
            raise ValueError(f"config: quant_method {method!r} is not one of "
                             f"{', '.join(FORMATS)} (pass format= to override)")
        return method
    for name in tensors:
        if name.endswith(".weight_packed"):
            return "compressed-tensors"
        if name.endswith(".weight_scale_inv"):
            return "fp8"
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            scales = tensors.get(f"{prefix}.scales")
            if scales is None:
                break
            # GPTQ packs along in ([K/8, N]), AWQ along out ([K, N/8]); scales are [G, N].
            return "gptq" if tensors[name].shape[1] == scales.shape[1] else "awq"
    raise ValueError("source: no config.json quantization_config and no GPTQ/AWQ "
                     "(.qweight), compressed-tensors (.weight_packed) or native fp8 "
                     "(.weight_scale_inv) tensors; pass format=")


def _gptq_args(config: Mapping) -> dict:
    if config.get("desc_act"):
        raise ValueError("config: desc_act=True (act-order) GPTQ checkpoint: its input features "
                         "are permuted per layer, which a swapped Linear cannot apply; import "
                         "its layers with interop.from_gptq(..., permute_act_order=True)")
    version = 2 if config.get("checkpoint_format") == "gptq_v2" else 1
    return {"bits": int(config.get("bits", 4)), "version": version}


def _ct_layer_args(config: Mapping, prefix: str, parts: Mapping) -> tuple[dict, bool]:
    """from_compressed_tensors keywords and quantize_activation for one layer."""
    if not config:
        return _ct_inferred_args(parts), False
    groups = config.get("config_groups") or {}
    chosen = None
    for name, group in groups.items():
        targets = group.get("targets") or []
        regexes = [t[3:] for t in targets if t.startswith("re:")]
        if any(re.fullmatch(r, prefix) or re.match(r, prefix) for r in regexes):
            chosen = name
            break
        if chosen is None and len(regexes) < len(targets):  # a class-name target ("Linear")
            chosen = name
    if chosen is None:
        raise ValueError(f"config: no config group targets layer {prefix!r}")
    args = scheme_args(config, chosen)
    return args["importer"], args["quantize_activation"]


def _ct_inferred_args(parts: Mapping) -> dict:
    """Layer parameters read off the tensors (no config.json)."""
    scale = parts["weight_scale"]
    packed = parts.get("weight_packed")
    if packed is not None and np.asarray(packed).dtype == np.uint8:  # fp4 pairs
        if "weight_global_scale" in parts:
            return dict(num_bits=4, strategy="tensor_group", group_size=16,
                        compression_format="nvfp4-pack-quantized")
        return dict(num_bits=4, strategy="group", group_size=32,
                    compression_format="mxfp4-pack-quantized")
    if packed is None and np.asarray(parts["weight"]).dtype == ml_dtypes.float8_e4m3fn:
        n, k = parts["weight"].shape
        scale = np.asarray(scale)
        if scale.size == 1:
            return dict(num_bits=8, strategy="tensor", compression_format="float-quantized")
        if scale.shape in ((n, 1), (n,)):
            return dict(num_bits=8, strategy="channel", compression_format="float-quantized")
        if scale.dtype == np.uint8:
            return dict(num_bits=8, strategy="group", group_size=32,
                        compression_format="mxfp8-quantized")
        if scale.shape[0] == n:
            return dict(num_bits=8, strategy="group", group_size=k // scale.shape[1],
                        compression_format="float-quantized")
        # Block scales [ceil(n/rows), ceil(k/cols)]: rows, cols as the common 128 x 128.
        return dict(num_bits=8, strategy="block", block_structure=[128, 128],
                    compression_format="float-quantized")
    if "weight_packed" in parts:
        n, k = (int(d) for d in np.asarray(parts["weight_shape"]).reshape(-1))
        words = parts["weight_packed"].shape[1]  # ceil(K * bits / 32)
        bits = {-(-k // 8): 4, -(-k // 4): 8}.get(words)
        if bits is None:
            raise ValueError(f"weight_packed: {words} words per row fit neither 4- nor 8-bit "
                             f"values for in={k}")
        fmt = "pack-quantized"
    else:
        n, k = parts["weight"].shape
        bits, fmt = 8, "int-quantized"
    groups = scale.shape[1] if scale.ndim == 2 else 1
    strategy = "channel" if groups == 1 else "group"
    return dict(num_bits=bits, group_size=None if groups == 1 else k // groups,
                symmetric="weight_zero_point" not in parts, strategy=strategy,
                compression_format=fmt)


def _fp8_block(config: Mapping) -> tuple:
    block = config.get("weight_block_size")
    if block is None:
        if config:
            raise ValueError("config: quant_method 'fp8' without weight_block_size: only "
                             "block-scaled fp8 checkpoints (weight_scale_inv) are read; pass "
                             "block=(rows, cols)")
        return (128, 128)
    return tuple(int(b) for b in block)


def read_checkpoint(source, *, format: str | None = None, **overrides) -> ImportedCheckpoint:
    """Every quantized layer of a GPTQ, AWQ, compressed-tensors, native fp8 or
    ModelOpt checkpoint.

    Args:
      source: a directory (``config.json`` + ``*.safetensors``, sharded or
        not) or one ``.safetensors`` file (a ``config.json`` beside it is read).
      format: "gptq", "awq", "compressed-tensors", "fp8" or "modelopt" to
        override detection.
      **overrides: importer keywords that win over the config (e.g.
        ``target_bits=8``, ``exact=False``, GPTQ ``version=2``, fp8
        ``block=(128, 128)``, ModelOpt ``quant_algo="NVFP4"``).

    Float weights (fp8, fp4) come back holding the checkpoint's storage;
    ``quantize_activation`` is True where the checkpoint quantizes
    activations (fp8 or fp4, static or dynamic): `quantized_matmul` then
    quantizes them to fp8 per token (and block) dynamically (API.md section 7).

    Raises:
      ValueError: the format cannot be told or is not supported, or layers
        fail to import -- every failing layer in one message.
    """
    files, config = _files(source)
    tensors = _load_tensors(files)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    try:
        fmt = format or detect_format(tensors, config)
    except ValueError as e:  # say which files could not be told
        raise ValueError(f"{e} (in {', '.join(files)})") from None
    layers = layer_tensors(tensors, fmt)
    if not layers:
        raise ValueError(f"source: no {fmt} quantized layers in {', '.join(files)}")
    weights, quantize_activation, used, problems = {}, {}, set(), []
    for prefix, parts in layers.items():
        arrays = {arg: tensors[t] for arg, t in parts.items()}
        try:
            if fmt == "fp8":
                block = overrides["block"] if "block" in overrides else _fp8_block(config)
                weight = from_fp8_blocks(arrays["weight"], arrays["weight_scale_inv"],
                                         block=block)
                # DeepSeek-style checkpoints quantize activations per token and block of
                # block[1] (dynamic); a static input_scale is replaced by that rule.
                qa = bool(config.get("activation_scheme")) or "input_scale" in arrays
            elif fmt == "modelopt":
                algo = overrides.get("quant_algo", config.get("quant_algo", "NVFP4"))
                weight = from_modelopt(arrays, quant_algo=algo,
                                       group_size=int(overrides.get(
                                           "group_size", config.get("group_size") or 16)))
                qa = "input_scale" in arrays
            elif fmt == "gptq":
                weight = from_gptq(**arrays, **{**_gptq_args(config), **overrides})
                qa = False
            elif fmt == "awq":
                weight = from_awq(**arrays, **overrides)
                qa = False
            else:
                args, qa = _ct_layer_args(config, prefix, arrays)
                weight = from_compressed_tensors(arrays, **{**args, **overrides})
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"{prefix}: {e}")
            continue
        weights[prefix], quantize_activation[prefix] = weight, qa
        used.update(parts.values())
    if problems:
        raise ValueError(f"source: {len(problems)} of {len(layers)} {fmt} layers of "
                         f"{', '.join(files)} do not import:\n  " + "\n  ".join(problems))
    others = {name: a for name, a in tensors.items() if name not in used}
    return ImportedCheckpoint(format=fmt, weights=weights,
                              quantize_activation=quantize_activation, tensors=others,
                              config=dict(config))
