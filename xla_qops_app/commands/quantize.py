"""`xla-qops quantize`: a float safetensors model in, a quantized safetensors model out.

Which tensors are quantized (the "Linear weight" rule):

1. the name ends in ``.weight``, the tensor is 2-D and floating point
   (torch ``nn.Linear`` orientation ``[out, in]`` is assumed);
2. its layer name (the name without ``.weight``) matches a ``--filter``
   pattern, when any are given;
3. it matches no ``--skip`` pattern and, unless ``--no-default-skip``, none of
   `DEFAULT_SKIP` (embeddings and normalisation layers, which are lookups or
   elementwise, not matmuls).

Patterns are shell globs (fnmatch), matched case-insensitively against the
layer name. Everything else (biases, LayerNorm, embeddings, integer buffers)
is copied unchanged. Output tensor names are a module-swapped model's
``state_dict()`` names: ``<layer>.weight``, ``<layer>.weight_scaler``,
``<layer>.zero_point`` (with ``--asymmetric``), ``<layer>.bias``; the
per-layer scheme goes into the safetensors metadata (`xla_qops.checkpoint`).

``--method`` picks the quantizer (docs/quantizers.md): ``rtn`` and ``hqq`` work
on each tensor alone; ``gptq``, ``awq`` and ``awq+gptq`` need ``--calibration`` and
a model directory with a ``config.json``, from which the float model is built
(transformers) and run on the calibration inputs (`calibrated_weights`).

``--smoothing hadamard`` rotates each quantized layer's inputs (the same rule
as ``quantize_model(..., smoothing="hadamard")``, `xla_qops.quantizers.rotation`):
the file holds W H, quantized by ``--method`` (rtn, hqq, gptq, awq, awq+gptq;
the calibrated ones fit the rotated inputs' statistics), and
``<layer>.input_rotation``, an int64 scalar: the block b of H (the largest
power of two dividing ``in``, at most 64; a layer with an odd ``in`` is not
rotated and has none). A model swapped with the same scheme and smoothing
loads it; loaders refuse it into a layer that would not rotate. Integer
schemes and the xla-qops format only.

A block size that does not divide a layer's input features is an error
naming every such layer, unless ``--skip-indivisible`` keeps those layers in
float (and says so in the report).

``--format compressed-tensors`` writes what vLLM reads instead: a directory
with ``model.safetensors`` in compressed-tensors' layout (``pack-quantized``
for W4A16/W8A16, ``int-quantized`` with dynamic per-token int8 activations
for W8A8/W4A8; `xla_qops.interop.to_compressed_tensors`) and ``config.json``
(the input directory's, if it has one) with its ``quantization_config``;
skipped weights go to ``ignore``. Symmetric only: compressed-tensors stores
integer zero points, ``--asymmetric`` gives float ones.

Float element formats (API.md section 7): ``--scheme w8a16-fp8`` (e4m3fn
weights, scale amax/448 per channel or block), ``w8a8-fp8`` (and fp8
activations per token), ``w4a16-mxfp4`` (e2m1, power-of-two scales per block
of 32 unless ``--block-size`` says otherwise), ``w4a16-nvfp4`` (e2m1, blocks
of 16) and ``w4a8-fp8`` (int4 weights, fp8 activations). The float weight
formats are symmetric, rounded to nearest even onto their grid by ``--method
rtn``, ``gptq`` or ``awq`` (xla_qops.schemes.float_format_problem has the
rules); their ``.weight`` is float8_e4m3fn (safetensors ``F8_E4M3``) or uint8
packed e2m1 codes, with no zero point.

``--format compressed-tensors`` writes the float schemes as llm-compressor does
(`CT_FLOAT`; tensor names, dtypes and config groups of its FP8_DYNAMIC,
MXFP4A16 and NVFP4A16 presets): ``float-quantized`` (``weight`` F8_E4M3,
``weight_scale`` float32 ``[out, 1]``, strategy "channel"; "group" with
``--block-size``) for w8a16-fp8 and w8a8-fp8 (with dynamic per-token fp8
``input_activations``), ``mxfp4-pack-quantized`` (blocks of 32, E8M0 exponent
scales) and ``nvfp4-pack-quantized`` (e4m3 ``weight_scale`` per 16,
``weight_global_scale``). NVFP4 stores its per-tensor factor as a divisor
(``scale = weight_scale / weight_global_scale``), where `quantize_weight`'s
NVFP4 multiplies one (ModelOpt's form), and the two roundings differ; so for
this output the NVFP4 weights are quantized in the divisor form itself
(llm-compressor's rule: ``g = 448 * 6 / amax``, block scale ``e4m3(amax_b / 6 *
g)``; `xla_qops.quantizers.float_formats`), which the checkpoint reproduces bit
for bit. ``w4a8-fp8`` (int4 weights with fp8 activations) is not written in
this format.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import sys

import numpy as np

from xla_qops import quantizers
from xla_qops.quantizers import rotation
from xla_qops.schemes import FORMAT_BLOCKS, SCHEMES, float_format_problem, format_block_size
from xla_qops_app.calibration import BATCH as CALIBRATION_BATCH, tokenized_batches

# compressed-tensors format of each float scheme's weights (llm-compressor's presets)
CT_FLOAT = {"w8a16-fp8": "float-quantized", "w8a8-fp8": "float-quantized",
            "w4a16-mxfp4": "mxfp4-pack-quantized", "w4a16-nvfp4": "nvfp4-pack-quantized"}
FORMATS = ("xla-qops", "compressed-tensors")
DEFAULT_SKIP = ("*embed*", "*norm*", "*ln_*")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="float model: a .safetensors file, or a directory holding "
                                      "exactly one (e.g. a Hugging Face model directory)")
    parser.add_argument("output", help="quantized .safetensors file to write")
    parser.add_argument("--scheme", default="w8a16", choices=list(SCHEMES),
                        help="weight bits and activation handling (default w8a16); the -fp8, "
                             "-mxfp4 and -nvfp4 schemes use float element formats")
    parser.add_argument("--block-size", type=int, default=-1,
                        help="-1 per-channel (default), or B: one scale per B input features")
    parser.add_argument("--asymmetric", action="store_true",
                        help="min/max quantization with a float zero point (default symmetric)")
    parser.add_argument("--filter", action="append", default=[], metavar="PATTERN",
                        help="only quantize layers matching this glob (repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                        help="never quantize layers matching this glob (repeatable)")
    parser.add_argument("--no-default-skip", action="store_true",
                        help=f"do not skip {', '.join(DEFAULT_SKIP)} by default")
    parser.add_argument("--skip-indivisible", action="store_true",
                        help="keep layers whose input features the block size does not divide "
                             "in float instead of failing")
    parser.add_argument("--format", default="xla-qops", choices=FORMATS,
                        help="xla-qops (default): one .safetensors file for this library; "
                             "compressed-tensors: a directory vLLM loads (OUTPUT is a directory)")
    parser.add_argument("--method", default="rtn",
                        choices=quantizers.MODEL_METHODS,
                        help="rtn (round to nearest, default), hqq (no data), or the calibrated "
                             f"{', '.join(quantizers.CALIBRATED)} (need --calibration); "
                             "docs/quantizers.md")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="gptq/awq: a text file of sentences (one per line; tokenized with "
                             "the input directory's tokenizer) or a .safetensors file with an "
                             "integer 'input_ids' [n, seq]; the model is built from the input "
                             "directory's config.json (transformers)")
    parser.add_argument("--smoothing", default=None, choices=("hadamard",),
                        help="hadamard: store each weight rotated by a block-diagonal Hadamard "
                             "matrix and its block as <layer>.input_rotation (the model rotates "
                             "its inputs at run time); integer schemes, xla-qops format; "
                             "docs/quantizers.md 'Rotate the inputs'")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclasses.dataclass
class Layer:
    name: str
    shape: tuple[int, int]
    bytes_before: int
    bytes_after: int = 0
    skipped: str = ""  # reason; empty when quantized


@dataclasses.dataclass
class Report:
    source: str
    output: str
    scheme: str
    block_size: int
    symmetric: bool
    layers: list[Layer]
    other_tensors: int
    bytes_before: int
    bytes_after: int
    method: str = "rtn"
    rotated: int | None = None  # with --smoothing hadamard: layers whose inputs rotate

    @property
    def quantized(self) -> list[Layer]:
        return [layer for layer in self.layers if not layer.skipped]

    @property
    def skipped(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.skipped]

    def lines(self) -> list[str]:
        mib = 2.0 ** 20
        q = self.quantized
        out = [f"{self.source} -> {self.output}",
               f"scheme {self.scheme}, block_size {self.block_size}, "
               f"{'symmetric' if self.symmetric else 'asymmetric (zero point)'}, "
               f"method {self.method}",
               f"quantized {len(q)} linear weights:"]
        width = max([len(layer.name) for layer in self.layers] + [5])
        def shape(layer):
            return f"[{layer.shape[0]}, {layer.shape[1]}]".ljust(13)

        for layer in q:
            out.append(f"  {layer.name:<{width}}  {shape(layer)} "
                       f"{layer.bytes_before:>11,} B -> {layer.bytes_after:>10,} B")
        out.append(f"skipped {len(self.skipped)} 2-D weights:")
        out.extend(f"  {layer.name:<{width}}  {shape(layer)} {layer.skipped}"
                   for layer in self.skipped)
        qb = sum(layer.bytes_before for layer in q)
        qa = sum(layer.bytes_after for layer in q)
        if self.rotated is not None:
            out.append(f"inputs rotated (Hadamard blocks, <layer>.input_rotation): "
                       f"{rotation.rotated_count(self.rotated, len(q))}")
        out.append(f"copied {self.other_tensors} other tensors unchanged (skipped weights, biases, "
                   f"norms, buffers)")
        if q:
            out.append(f"linear weights: {qb / mib:.2f} MiB -> {qa / mib:.2f} MiB "
                       f"({qb / max(qa, 1):.2f}x smaller)")
        out.append(f"file tensors:   {self.bytes_before / mib:.2f} MiB -> "
                   f"{self.bytes_after / mib:.2f} MiB "
                   f"({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)")
        return out


def resolve_input(path: str) -> str:
    """A .safetensors file, or the single .safetensors file of a directory."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"input: expected exactly one .safetensors file in directory {path}, found "
                f"{len(found)}{': ' + ', '.join(found) if found else ''}")
        return os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input: no such file or directory: {path}")
    return path


def _match(name: str, patterns) -> str | None:
    low = name.lower()
    for p in patterns:
        if fnmatch.fnmatchcase(low, p.lower()):
            return p
    return None


def _is_float(dtype: str) -> bool:
    return dtype in ("F32", "F16", "BF16", "F64")


def plan(header: dict[str, tuple[list[int], str]], *, bits: int, block_size: int, filters,
         skips, skip_indivisible: bool) -> tuple[list[Layer], list[str]]:
    """Decides, from shapes and dtypes alone, which layers to quantize.

    Args:
      header: tensor name -> (shape, safetensors dtype string).

    Returns:
      (layers, errors): one `Layer` per 2-D float ``*.weight`` (with a skip
      reason or none), and the indivisible-layer errors (empty unless
      `skip_indivisible` is False and some layer does not fit the block).
    """
    layers, errors = [], []
    for name, (shape, dtype) in header.items():
        if not (name.endswith(".weight") and len(shape) == 2 and _is_float(dtype)):
            continue
        layer_name = name[: -len(".weight")]
        out_f, in_f = shape
        itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[dtype]
        layer = Layer(layer_name, (out_f, in_f), out_f * in_f * itemsize)
        if filters and not _match(layer_name, filters):
            layer.skipped = "not matched by --filter"
        elif (p := _match(layer_name, skips)) is not None:
            layer.skipped = f"matches skip pattern {p!r}"
        elif block_size != -1 and in_f % block_size:
            reason = f"block size {block_size} does not divide in_features={in_f}"
            if skip_indivisible:
                layer.skipped = reason + " (--skip-indivisible)"
            else:
                errors.append(f"layer {layer_name!r} [{out_f}, {in_f}]: {reason}")
        elif bits == 4 and in_f % 2:
            reason = f"packed int4 needs an even in_features, got {in_f}"
            if skip_indivisible:
                layer.skipped = reason + " (--skip-indivisible)"
            else:
                errors.append(f"layer {layer_name!r} [{out_f}, {in_f}]: {reason}")
        layers.append(layer)
    return layers, errors


def calibration_inputs(path: str, model_dir: str) -> list:
    """Model inputs from a text file of sentences or a safetensors file of token ids."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration: no such file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        tensors = load_file(path)
        ids = tensors.get("input_ids")
        if ids is None or ids.ndim != 2 or ids.is_floating_point():
            found = {k: (str(v.dtype), list(v.shape)) for k, v in tensors.items()}
            raise ValueError(f"calibration: expected an integer 'input_ids' [n, seq] in {path}, "
                             f"found {found}")
        return [{"input_ids": ids[i:i + CALIBRATION_BATCH].long()}
                for i in range(0, len(ids), CALIBRATION_BATCH)]
    with open(path, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    if not sentences:
        raise ValueError(f"calibration: {path} holds no sentences (one per line)")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenized_batches(tokenizer, sentences)


def load_float_model(model_dir: str):
    """The float torch model of a Hugging Face directory (a causal LM if its config says so)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return cls.from_pretrained(model_dir, torch_dtype="float32").eval()


def calibrated_weights(model_dir: str, calibration: str, layer_names, *, bits: int,
                       block_size: int, symmetric: bool, quantize_activation: bool, method: str,
                       progress: bool, format: str = "int", nvfp4_divisor: bool = False,
                       rotate: bool = False) -> dict:
    """{layer name: QuantizedWeight} of the file's layers, by running the model (`rotate`:
    each fitted as W H on the rotated inputs' statistics, `calibrate.quantize_linears`)."""
    import jax.numpy as jnp
    import ml_dtypes

    import xla_qops
    from torch_bridge import calibrate
    from xla_qops.quantizers import float_formats
    from torch_bridge.swap import linear_holders, swap_into

    import torch

    model = load_float_model(model_dir)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    matched = {}
    for layer in layer_names:
        hits = [n for n in modules if layer == n or layer.endswith("." + n) or n.endswith("." + layer)]
        if len(hits) != 1:
            raise ValueError(f"layer {layer!r}: expected one Linear of the model built from "
                             f"{model_dir}/config.json to match it, found {len(hits)}"
                             f"{': ' + ', '.join(hits) if hits else ''}")
        matched[hits[0]] = layer
    holders = linear_holders(model)
    inputs = calibrate.check_inputs(calibration_inputs(calibration, model_dir))
    results = calibrate.quantize_linears(
        model, [(n, modules[n]) for n in matched], bits=bits, block_size=block_size,
        symmetric=symmetric, quantize_activation=quantize_activation, method=method,
        inputs=inputs, smoothing=None, smoothing_alpha=0.5,
        # Swapped as they go: later layers calibrate on the quantized earlier ones.
        swap=lambda name, quantized: swap_into(holders[id(modules[name])], quantized),
        progress=progress, format=format, nvfp4_divisor=nvfp4_divisor, rotate=rotate,
        search_scales=False)  # only the Linears are written: no place for 1/s
    out = {}
    for name, layer in matched.items():
        m = results[name].module
        weight = m.weight.detach().cpu()
        if weight.dtype == torch.float8_e4m3fn:  # numpy has no float8: its bytes, viewed
            weight = weight.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        else:
            weight = weight.numpy()
        out[layer] = xla_qops.QuantizedWeight(
            w=jnp.asarray(weight), scale=jnp.asarray(m.weight_scaler.numpy()),
            zero_point=None if m.zero_point is None else jnp.asarray(m.zero_point.numpy()),
            bits=bits, block_size=block_size, packed=m.packed,
            format="int" if format == "int" else float_formats.element_format(format))
    return out


def quantize_file(source: str, output: str, *, scheme: str = "w8a16", block_size: int = -1,
                  symmetric: bool = True, filters=(), skips=(), default_skip: bool = True,
                  skip_indivisible: bool = False, progress: bool = True,
                  format: str = "xla-qops", method: str = "rtn",
                  calibration: str | None = None, smoothing: str | None = None) -> Report:
    """Quantizes every Linear weight of a safetensors model; see the module docstring."""
    import jax.numpy as jnp
    from safetensors import safe_open
    from tqdm import tqdm

    import xla_qops
    from xla_qops import checkpoint, interop
    from xla_qops.quantize import quantize_float

    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {', '.join(sorted(SCHEMES))}, got {scheme!r}")
    if block_size != -1 and block_size <= 0:
        raise ValueError(f"block-size: expected -1 (per-channel) or a positive integer, got "
                         f"{block_size}")
    spec = SCHEMES[scheme]
    bits, quantize_activation = spec.bits, spec.quantize_activation
    problem = float_format_problem(spec.format, subject=f"scheme {scheme}",
                                   block_size=block_size, symmetric=symmetric, method=method,
                                   cli=True)
    if problem:
        raise ValueError(problem)
    block_size = format_block_size(spec.format, block_size)
    if bits == 4 and block_size != -1 and block_size % 2:  # e2m1 pairs: the rule above
        raise ValueError(f"block-size: packed int4 pairs values inside a block, so it must be "
                         f"even, got {block_size}")
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if format == "compressed-tensors":
        _check_compressed_tensors_scheme(scheme, spec, block_size)
    if format == "compressed-tensors" and not symmetric:
        raise ValueError("asymmetric: compressed-tensors stores integer zero points and "
                         "quantize_weight's min/max zero points are floats; drop --asymmetric "
                         "with --format compressed-tensors")
    from xla_qops.quantize import check_method
    check_method(method, calibration is not None,
                 calibration_is="--calibration FILE: sentences, or safetensors input_ids",
                 methods=quantizers.MODEL_METHODS)
    if smoothing is not None:
        if smoothing != "hadamard":
            raise ValueError(f"smoothing: expected None or 'hadamard', got {smoothing!r}")
        rotation.check_arguments(scheme, method)
        if format != "xla-qops":
            raise ValueError("smoothing: the rotation is stored as <layer>.input_rotation, "
                             "which only the xla-qops format has (compressed-tensors readers "
                             "would run the rotated weights on unrotated inputs); use "
                             "--format xla-qops")
    rotate = smoothing == "hadamard"
    source_dir = source if os.path.isdir(source) else None
    if calibration is not None and (source_dir is None or not os.path.isfile(
            os.path.join(source_dir, "config.json"))):
        raise ValueError(f"calibration: --method {method} runs the model, so the input must be "
                         f"a model directory with a config.json, got {source}")
    source = resolve_input(source)
    if os.path.abspath(source) == os.path.abspath(output):
        raise ValueError(f"output: would overwrite the input {source}")
    skips = list(skips) + (list(DEFAULT_SKIP) if default_skip else [])

    with safe_open(source, framework="numpy") as f:
        names = list(f.keys())
        header = {}
        for name in names:
            sl = f.get_slice(name)
            header[name] = (sl.get_shape(), sl.get_dtype())
        layers, errors = plan(header, bits=bits, block_size=block_size, filters=filters,
                              skips=skips, skip_indivisible=skip_indivisible)
        if errors:
            raise ValueError(f"--block-size {block_size} does not fit {len(errors)} layer(s) "
                             f"(pass --skip-indivisible to keep them in float):\n  "
                             + "\n  ".join(errors))
        todo = {layer.name: layer for layer in layers if not layer.skipped}
        # NVFP4 for compressed-tensors: its divisor form, which the checkpoint holds exactly.
        nvfp4_divisor = format == "compressed-tensors" and spec.format == "nvfp4"
        prepared = {}
        if calibration is not None:
            prepared = calibrated_weights(source_dir, calibration, list(todo), bits=bits,
                                          block_size=block_size, symmetric=symmetric,
                                          quantize_activation=quantize_activation,
                                          method=method, progress=progress, format=spec.format,
                                          nvfp4_divisor=nvfp4_divisor, rotate=rotate)
        state, schemes, ct_groups, before, rotated = {}, {}, {}, 0, 0
        bar = tqdm(total=len(names), desc="quantize", unit="tensor", disable=not progress,
                   file=sys.stderr)
        for name in names:
            array = f.get_tensor(name)
            before += array.nbytes
            layer = todo.get(name[: -len(".weight")]) if name.endswith(".weight") else None
            if layer is None:
                state[name] = array
            else:
                block = rotation.block_for(layer.shape[1]) if rotate else 1
                if block > 1:  # the weight in the rotated basis (calibrated: fitted so)
                    if layer.name not in prepared:
                        array = rotation.rotate_weight_array(np.asarray(array, np.float32),
                                                             block)
                    state[f"{layer.name}.input_rotation"] = np.asarray(block, np.int64)
                    rotated += 1
                if layer.name in prepared:
                    qw = prepared[layer.name]
                elif spec.format != "int":
                    qw = quantize_float(np.asarray(array, np.float32), spec.format, block_size,
                                        method, nvfp4_divisor=nvfp4_divisor)
                else:
                    qw = xla_qops.quantize_weight(
                        jnp.asarray(array, jnp.float32), bits=bits, block_size=block_size,
                        symmetric=symmetric, pack=True, method=method)
                schemes[layer.name] = checkpoint.LayerScheme.of(
                    qw, quantize_activation, spec.activation_format)
                if format == "compressed-tensors":
                    ct = interop.to_compressed_tensors(qw, compression_format=CT_FLOAT.get(
                        scheme, "int-quantized" if quantize_activation else "pack-quantized"))
                    ct_groups[layer.name] = ct.config_group(quantize_activation)
                    state.update({f"{layer.name}.{k}": v for k, v in ct.tensors.items()})
                    layer.bytes_after = sum(v.nbytes for v in ct.tensors.values())
                else:
                    state[name] = np.asarray(qw.w)
                    state[f"{layer.name}.weight_scaler"] = np.asarray(qw.scale)
                    if qw.zero_point is not None:
                        state[f"{layer.name}.zero_point"] = np.asarray(qw.zero_point)
                    layer.bytes_after = qw.nbytes
            bar.update(1)
        bar.close()
    settings = {"scheme": scheme, "block_size": block_size, "symmetric": symmetric,
                "source": os.path.basename(source), "method": method, "smoothing": smoothing}
    if format == "compressed-tensors":
        _write_compressed_tensors(output, state, source_dir, ct_groups,
                                  ignore=[layer.name for layer in layers if layer.skipped])
    else:
        checkpoint.save_state_dict(output, state, schemes,
                                   metadata={"xla_qops.quantize": json.dumps(settings)})
    after = sum(a.nbytes for a in state.values())
    return Report(source=source, output=output, scheme=scheme, block_size=block_size,
                  symmetric=symmetric, layers=layers,
                  other_tensors=len(names) - len(todo), bytes_before=before, bytes_after=after,
                  method=method, rotated=rotated if rotate else None)


def _check_compressed_tensors_scheme(scheme: str, spec, block_size: int) -> None:
    """What `--format compressed-tensors` writes (module docstring), checked before any work."""
    if spec.format == "int" and spec.activation_format == "fp8":
        raise ValueError(f"format: compressed-tensors output is written for the int schemes "
                         f"(w8a16, w4a16, w8a8, w4a8) and the float ones ({', '.join(CT_FLOAT)}), "
                         f"got --scheme {scheme} (int4 weights with fp8 activations); use "
                         f"--format xla-qops")
    if spec.format == "mxfp4" and block_size != FORMAT_BLOCKS["mxfp4"]:
        raise ValueError(f"block-size: compressed-tensors' mxfp4-pack-quantized has blocks of "
                         f"32, got {block_size}; drop --block-size or use --format xla-qops")


def _write_compressed_tensors(output: str, state: dict, source_dir, layer_groups: dict,
                              ignore) -> None:
    """`output`/model.safetensors and `output`/config.json with its quantization_config.

    layer_groups: {layer name: its config group (`CompressedTensorsLayer.config_group`)}.
    Layers sharing one group (every layer, unless a layer's weights config differs, e.g.
    fp8 scales that happen to repeat over 128 rows: strategy "block") target "Linear";
    otherwise each group names its layers and the format is "mixed-precision".
    """
    from safetensors.numpy import save_file

    os.makedirs(output, exist_ok=True)
    # C order: safetensors.numpy writes an array's raw buffer, whatever its strides.
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    config = {}
    if source_dir is not None and os.path.isfile(os.path.join(source_dir, "config.json")):
        with open(os.path.join(source_dir, "config.json")) as f:
            config = json.load(f)
    distinct = {}  # the group's JSON -> its layers
    for name, group in layer_groups.items():
        distinct.setdefault(json.dumps(group, sort_keys=True), []).append(name)
    groups = {}
    for i, (key, names) in enumerate(distinct.items()):
        group = json.loads(key)
        if len(distinct) > 1:
            group["targets"] = sorted(names)
        groups[f"group_{i}"] = group
    formats = {g["format"] for g in groups.values()}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": groups,
        "ignore": sorted(ignore)}
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def run(args) -> int:
    report = quantize_file(args.input, args.output, scheme=args.scheme,
                           block_size=args.block_size, symmetric=not args.asymmetric,
                           filters=args.filter, skips=args.skip,
                           default_skip=not args.no_default_skip,
                           skip_indivisible=args.skip_indivisible,
                           progress=not args.no_progress, format=args.format,
                           method=args.method, calibration=args.calibration,
                           smoothing=args.smoothing)
    print("\n".join(report.lines()))
    return 0
