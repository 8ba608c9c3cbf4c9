"""Saving and loading quantized weights and models with safetensors (no pickle).

File layout: a plain safetensors file whose tensor names are those of a
module-swapped model's ``state_dict()``: for a quantized linear layer at
``<prefix>``

* ``<prefix>.weight``: int8 (8-bit, or unpacked int4) or uint8 (packed int4)
  in API.md section 2's layout; for the float element formats of section 7,
  float8_e4m3fn (fp8, safetensors ``F8_E4M3``, int8's shapes) or uint8 (fp4:
  e2m1 codes packed as int4),
* ``<prefix>.weight_scaler``: float ``[out]`` or ``[in/B, out]``,
* ``<prefix>.zero_point``: like ``weight_scaler``, only for asymmetric layers,
* ``<prefix>.bias`` and any other tensor (embeddings, LayerNorm, ...) as given.

These are torch_xla's ``XlaQuantizedLinear`` buffer names, which
``torch_bridge.XlaQuantizedLinear`` keeps, so a saved file loads into a
module-swapped model with ``load_state_dict``.

The safetensors metadata (string -> string) holds ``"format": "pt"`` and
``"xla_qops.schemes"``: JSON ``{prefix: LayerScheme fields}`` (bits,
block_size, packed, symmetric, quantize_activation, in/out features, scale
dtype, weight and activation formats, scheme name; files written before the
formats existed lack the two formats and read as the int formats). Loading checks every quantized layer's tensors against
its scheme, and optionally every tensor against an expected state dict; all
problems are reported in one `CheckpointError`.

Arrays are numpy (bfloat16 via ml_dtypes); torch tensors are accepted where
arrays are. Saving and loading a torch model's state dict is
``torch_bridge.checkpoint`` (``save_torch`` / ``load_torch``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional

import ml_dtypes
import numpy as np

from xla_qops.interop._core import to_numpy
from xla_qops.quantize import QuantizedWeight
from xla_qops.spec import WeightFormatFacts, check_format_names, fill_formats

SCHEMES_KEY = "xla_qops.schemes"
VERSION_KEY = "xla_qops.version"
VERSION = "1"
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# A quantized layer's optional tensors that change what it computes (torch_bridge's
# XlaQuantizedLinear buffers): never dropped as extras.
INPUT_TRANSFORMS = {"input_rotation": "rotates", "input_scale": "scales"}


class CheckpointError(ValueError):
    """A checkpoint does not match its metadata or the expected tensors.

    `problems` lists every mismatch; the message shows them all.
    """

    def __init__(self, path, problems):
        self.problems = list(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{path}: {len(self.problems)} tensor(s) do not match:\n  {lines}")


@dataclasses.dataclass(frozen=True)
class LayerScheme(WeightFormatFacts):
    """How one linear layer is quantized; enough to rebuild its module and check its tensors."""

    bits: int
    block_size: int
    packed: bool
    symmetric: bool
    quantize_activation: bool
    in_features: int
    out_features: int
    scale_dtype: str = "float32"
    # API.md section 7: "int8", "int4", "fp8" or "fp4" ("" derives int8/int4
    # from `bits`); with quantize_activation, "int8" or "fp8" (None derives
    # int8 for int weights, fp8 for float weights).
    weight_format: str = ""
    activation_format: Optional[str] = None

    def __post_init__(self):
        # A scheme may come from a file's metadata: the fields must describe a
        # layer (they decide the shapes every tensor is checked against).
        for name in ("bits", "block_size", "in_features", "out_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: expected an int, got {value!r}")
        k, b = self.in_features, self.block_size
        if self.bits not in (4, 8):
            raise ValueError(f"bits: expected 4 or 8, got {self.bits}")
        if self.packed and self.bits != 4:
            raise ValueError(f"packed: only 4-bit weights are packed, got bits={self.bits}")
        if k < 0 or self.out_features < 0:
            raise ValueError(f"in_features, out_features: expected >= 0, got {k}, "
                             f"{self.out_features}")
        if b != -1 and (b <= 0 or k % b):
            raise ValueError(f"block_size: expected -1 or a positive divisor of "
                             f"in_features={k}, got {b}")
        if self.packed and (k if b == -1 else b) % 2:
            pairs_along = "in_features" if b == -1 else "block_size"
            raise ValueError(f"packed: pairs need an even {pairs_along}")
        # Names checked as the op checks them; a file's activation format is
        # kept only with quantize_activation (the pairing is not an error here).
        check_format_names(self.weight_format or None, self.activation_format, True)
        fill_formats(self)

    @property
    def quantize_format(self) -> str:
        """`QuantizedWeight.format`: "int", "fp8" or "fp4"."""
        return self.weight_format if self.float_weight else "int"

    @property
    def scheme(self) -> str:
        """'w8a16', 'w4a16', 'w8a8' or 'w4a8' for the int formats; with a float format
        the formats follow: 'w8a16-fp8', 'w8a8-fp8', 'w4a16-fp4', 'w4a8-fp4',
        'w4a8-fp8' (int4 weights, fp8 activations), ..."""
        base = f"w{self.bits}a{8 if self.quantize_activation else 16}"
        act = self.activation_format
        if not self.float_weight:
            return base if act in (None, "int8") else f"{base}-{act}"
        if act in (None, "fp8"):
            return f"{base}-{self.weight_format}"
        return f"{base}-{self.weight_format}/{act}"

    @classmethod
    def of(cls, qw: QuantizedWeight, quantize_activation: bool = False,
           activation_format: Optional[str] = None) -> "LayerScheme":
        return cls(bits=qw.bits, block_size=qw.block_size, packed=qw.packed,
                   symmetric=qw.zero_point is None, quantize_activation=bool(quantize_activation),
                   in_features=qw.in_features, out_features=qw.out_features,
                   scale_dtype=np.dtype(qw.scale.dtype).name,
                   weight_format=qw.weight_format, activation_format=activation_format)

    def tensor_specs(self, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of the layer's quantized tensors (bias excluded)."""
        k, n, b = self.in_features, self.out_features, self.block_size
        stored = 2 if self.packed else 1
        if b == -1:
            w_shape, s_shape = (n, k // stored), (n,)
        else:
            w_shape, s_shape = (k // b, b // stored, n), (k // b, n)
        w_dtype = ("float8_e4m3fn" if self.weight_format == "fp8"
                   else "uint8" if self.packed else "int8")
        specs = {f"{prefix}.weight": (w_shape, w_dtype),
                 f"{prefix}.weight_scaler": (s_shape, self.scale_dtype)}
        if not self.symmetric:
            specs[f"{prefix}.zero_point"] = (s_shape, self.scale_dtype)
        return specs

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), scheme=self.scheme)

    @classmethod
    def from_json(cls, d: Mapping) -> "LayerScheme":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass
class QuantizedCheckpoint:
    """A loaded checkpoint: quantized layers as `QuantizedWeight`s plus every other tensor."""

    weights: dict[str, QuantizedWeight]
    schemes: dict[str, LayerScheme]
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]


def _shape(s) -> str:
    return "[" + ", ".join(str(int(d)) for d in s) + "]"


def check_tensors(tensors: Mapping[str, np.ndarray], schemes: Mapping[str, LayerScheme],
                  expected: Optional[Mapping[str, object]] = None, *,
                  strict: bool = True) -> list[str]:
    """Every mismatch between `tensors` and what `schemes` (and `expected`) demand.

    Args:
      tensors: name -> array (anything with .shape and .dtype).
      schemes: prefix -> LayerScheme.
      expected: optional name -> array or ``(shape, dtype)``, e.g. a target
        model's state_dict; then missing and unexpected names count too.
    """
    problems = []

    def compare(name, want_shape, want_dtype, source):
        if name not in tensors:
            problems.append(f"{name}: missing (expected {want_dtype} {_shape(want_shape)}, "
                            f"{source})")
            return
        have = tensors[name]
        have_dtype = dtype_name(have)
        if tuple(have.shape) != tuple(want_shape) or have_dtype != want_dtype:
            problems.append(f"{name}: expected {want_dtype} {_shape(want_shape)} ({source}), "
                            f"got {have_dtype} {_shape(have.shape)}")

    for prefix, scheme in schemes.items():
        for name, (shape, dtype) in scheme.tensor_specs(prefix).items():
            compare(name, shape, dtype, f"{scheme.scheme}, block_size={scheme.block_size}")
        if scheme.float_weight and f"{prefix}.zero_point" in tensors:
            problems.append(f"{prefix}.zero_point: unexpected: weight_format="
                            f"{scheme.weight_format!r} is symmetric (API.md section 7: no zero "
                            f"point)")
        bias = tensors.get(f"{prefix}.bias")
        if bias is not None and tuple(bias.shape) != (scheme.out_features,):
            problems.append(f"{prefix}.bias: expected shape [{scheme.out_features}] (out "
                            f"features), got {_shape(bias.shape)}")
    if expected is not None:
        for name, want in expected.items():
            if not strict and name not in tensors:
                continue
            if isinstance(want, tuple):
                shape, dtype = want
            else:
                shape, dtype = want.shape, dtype_name(want)
            compare(name, shape, dtype, "expected by the target")
        if strict:
            problems.extend(f"{name}: unexpected (not in the target)"
                            for name in tensors if name not in expected)
        else:  # extra tensors may be dropped, but never a quantized layer's input transform
            for name in tensors:
                prefix, _, leaf = name.rpartition(".")
                if name not in expected and prefix in schemes and leaf in INPUT_TRANSFORMS:
                    problems.append(f"{name}: the file's layer {prefix!r} {INPUT_TRANSFORMS[leaf]} "
                                    f"its inputs and the target's does not (dropping it would "
                                    f"give wrong outputs); quantize the target the same way")
    # One entry per tensor, in a stable order.
    return sorted(dict.fromkeys(problems))


def dtype_name(a) -> str:
    d = getattr(a, "dtype", None)
    s = str(d)
    return s[len("torch."):] if s.startswith("torch.") else np.dtype(d).name


def save_state_dict(path, state_dict: Mapping[str, object], schemes: Mapping[str, LayerScheme],
                    metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes a quantized model's state dict (numpy, JAX or torch arrays) to `path`.

    Raises `CheckpointError` (before writing) if a quantized layer's tensors
    do not match its scheme.
    """
    from safetensors.numpy import save_file

    arrays = {name: _contiguous(_to_numpy(a, name)) for name, a in state_dict.items()}
    problems = check_tensors(arrays, schemes)
    if problems:
        raise CheckpointError(path, problems)
    meta = {"format": "pt", VERSION_KEY: VERSION,
            SCHEMES_KEY: json.dumps({p: s.to_json() for p, s in schemes.items()}, sort_keys=True)}
    meta.update(metadata or {})
    save_file(arrays, os.fspath(path), metadata=meta)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """`a` C-contiguous with its own shape (np.ascontiguousarray turns a scalar into
    shape [1]: torch_bridge's int64 ``input_rotation`` buffer is a scalar)."""
    return np.ascontiguousarray(a).reshape(a.shape)


def load_state_dict(path, expected: Optional[Mapping[str, object]] = None, *,
                    strict: bool = True
                    ) -> tuple[dict[str, np.ndarray], dict[str, LayerScheme], dict[str, str]]:
    """Reads `path`: (tensors, schemes, metadata). All mismatches -> one `CheckpointError`.

    With `expected` (name -> array or (shape, dtype)), every tensor is also
    checked against it; `strict=False` ignores names present on one side only
    (like torch's ``load_state_dict(strict=False)``) and drops the file's
    extra tensors from the result.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    tensors, metadata = _read_file(path)
    schemes = read_schemes(metadata, path)
    problems = check_tensors(tensors, schemes, expected, strict=strict)
    if problems:
        raise CheckpointError(path, problems)
    if expected is not None and not strict:
        tensors = {k: v for k, v in tensors.items() if k in expected}
    return tensors, schemes, metadata


def _to_numpy(a, name: str) -> np.ndarray:
    """`to_numpy`, plus torch float8 tensors (torch cannot hand those to numpy): widened
    to float32 and narrowed with ml_dtypes, both exact."""
    dtype = str(getattr(a, "dtype", ""))
    if dtype.startswith("torch.float8_") and hasattr(a, "detach"):
        target = np.dtype(getattr(ml_dtypes, dtype[len("torch."):]))
        return a.detach().cpu().float().numpy().astype(target)
    return to_numpy(a, name)


def _read_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, float8 tensors included; the
    header is validated against the file first (`safetensors_header`: a file
    from anyone gives a ValueError naming it and the tensor)."""
    from xla_qops.interop.checkpoints import read_safetensors_with_metadata

    return read_safetensors_with_metadata(path)


def read_schemes(metadata: Mapping[str, str], path="checkpoint") -> dict[str, LayerScheme]:
    raw = metadata.get(SCHEMES_KEY)
    if raw is None:
        return {}
    try:
        layers = json.loads(raw)
        if not isinstance(layers, dict):
            raise TypeError(f"expected a JSON object, got a {type(layers).__name__}")
    except (ValueError, TypeError, RecursionError) as e:
        raise ValueError(f"{path}: metadata {SCHEMES_KEY!r} is not valid: {e}") from e
    schemes = {}
    for prefix, fields in layers.items():
        try:
            if not isinstance(fields, dict):
                raise TypeError(f"expected a JSON object, got {fields!r}")
            schemes[prefix] = LayerScheme.from_json(fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: metadata {SCHEMES_KEY!r}, layer {prefix!r}: {e}") from e
    return schemes


def save_quantized(path, weights: Mapping[str, QuantizedWeight],
                   tensors: Optional[Mapping[str, object]] = None, *,
                   quantize_activation: bool | Mapping[str, bool] = False,
                   metadata: Optional[Mapping[str, str]] = None,
                   activation_format: Optional[str] | Mapping[str, Optional[str]] = None
                   ) -> None:
    """Saves `QuantizedWeight`s (prefix -> weight) and any other tensors (bias, ...).

    `quantize_activation` (one flag, or per prefix) is recorded in the scheme
    so that the module rebuilt from the file runs W8A8/W4A8 when it should;
    `activation_format` (one, or per prefix) too: "int8" or "fp8" (None: int8
    for int weights, fp8 for float weights).
    """
    state, schemes = {}, {}
    for prefix, qw in weights.items():
        if not isinstance(qw, QuantizedWeight):
            raise TypeError(f"weights[{prefix!r}]: expected a QuantizedWeight, got "
                            f"{type(qw).__name__}")
        qa = (quantize_activation.get(prefix, False) if isinstance(quantize_activation, Mapping)
              else quantize_activation)
        af = (activation_format.get(prefix) if isinstance(activation_format, Mapping)
              else activation_format)
        schemes[prefix] = LayerScheme.of(qw, qa, af if qa else None)
        state[f"{prefix}.weight"] = np.asarray(qw.w)
        state[f"{prefix}.weight_scaler"] = np.asarray(qw.scale)
        if qw.zero_point is not None:
            state[f"{prefix}.zero_point"] = np.asarray(qw.zero_point)
    for name, a in (tensors or {}).items():
        if name in state:
            raise ValueError(f"tensors: {name!r} is also a quantized layer's tensor")
        state[name] = a
    save_state_dict(path, state, schemes, metadata)


def load_quantized(path, expected: Optional[Mapping[str, object]] = None, *,
                   format: Optional[str] = None, **overrides) -> QuantizedCheckpoint:
    """Loads a quantized checkpoint: ``weights`` {module path: QuantizedWeight} + the rest.

    `path` is a file written by `save_quantized`, `save_state_dict` or
    ``xla-qops quantize``, or another tool's checkpoint -- a GPTQ, AWQ or
    compressed-tensors directory (``config.json`` + ``*.safetensors``) or
    ``.safetensors`` file, converted by `xla_qops.interop.read_checkpoint`
    (`format` and importer `overrides` go there; ``metadata["format"]`` says
    which format it was, ``schemes`` which layers quantize activations).
    """
    import jax.numpy as jnp

    if not os.path.exists(os.fspath(path)):
        raise FileNotFoundError(f"{os.fspath(path)}: no such checkpoint file or directory")
    if format is not None or overrides or not _is_own_file(path):
        return _load_foreign(path, expected, format, overrides)
    tensors, schemes, metadata = load_state_dict(path, expected)
    weights = {}
    for prefix, s in schemes.items():
        zp = tensors.pop(f"{prefix}.zero_point", None)
        weights[prefix] = QuantizedWeight(
            w=jnp.asarray(tensors.pop(f"{prefix}.weight")),
            scale=jnp.asarray(tensors.pop(f"{prefix}.weight_scaler")),
            zero_point=None if zp is None else jnp.asarray(zp),
            bits=s.bits, block_size=s.block_size, packed=s.packed, format=s.quantize_format)
    return QuantizedCheckpoint(weights=weights, schemes=schemes, tensors=tensors,
                               metadata=metadata)


def _is_own_file(path) -> bool:
    """A safetensors file with this project's scheme metadata."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    from xla_qops.interop.checkpoints import safetensors_header
    return SCHEMES_KEY in safetensors_header(path)[1]


def _activation_format(imported, prefix) -> Optional[str]:
    """An imported layer's activation format where the importer says (None: the
    default of section 7 for its weight format)."""
    formats = getattr(imported, "activation_format", None)
    if isinstance(formats, Mapping):
        return formats.get(prefix)
    return None


def _load_foreign(path, expected, format, overrides) -> QuantizedCheckpoint:
    from xla_qops.interop.checkpoints import read_checkpoint

    imported = read_checkpoint(path, format=format, **overrides)
    schemes = {p: LayerScheme.of(qw, imported.quantize_activation[p],
                                 _activation_format(imported, p))
               for p, qw in imported.weights.items()}
    if expected is not None:
        state = dict(imported.tensors)
        for prefix, qw in imported.weights.items():
            state[f"{prefix}.weight"] = np.asarray(qw.w)
            state[f"{prefix}.weight_scaler"] = np.asarray(qw.scale)
            if qw.zero_point is not None:
                state[f"{prefix}.zero_point"] = np.asarray(qw.zero_point)
        problems = check_tensors(state, schemes, expected, strict=True)
        if problems:
            raise CheckpointError(os.fspath(path), problems)
    return QuantizedCheckpoint(weights=imported.weights, schemes=schemes,
                               tensors=imported.tensors, metadata={"format": imported.format})
