"""Files from strangers (issue 27, docs/reliability.md).

Every reader of a file a user may have downloaded -- our safetensors format
(`xla_qops.checkpoint.load_quantized`, `torch_bridge.checkpoint.load_torch`),
foreign safetensors checkpoints (`xla_qops.interop.read_checkpoint`,
`torch_bridge.load_quantized`: compressed-tensors here) and GGUF
(`xla_qops.interop.read_gguf`) -- is handed truncated, bit-flipped and lying
files: header lengths, shapes, offsets, dtypes and tensor lengths that do not
match the data, shapes that claim terabytes, and a config.json that
contradicts the tensors. Shown for each:

* a ValueError (or its subclass CheckpointError / CheckpointMismatch) whose
  message names the file -- and the tensor where one entry lies -- never
  another exception type, never a crash;
* no allocation beyond the file's size (tracemalloc's peak, which counts
  Python's and numpy's allocations, stays under twice the file plus 1 MiB;
  a reader that trusted a claimed size would allocate it);
* for loads into an existing torch model: the model is untouched;
* no pickle anywhere in a load path: each loader runs with pickle.load(s),
  numpy.load and torch.load made to fail, and the load modules' source is
  scanned for them.
"""

from __future__ import annotations

import ast
import json
import pathlib
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

import xla_qops
from xla_qops import checkpoint, interop
from xla_qops.interop.checkpoints import read_safetensors

from conftest import HAVE_TORCH

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The modules that read files a user hands the library.
LOAD_MODULES = ["xla_qops/checkpoint.py", "xla_qops/interop/checkpoints.py",
                "xla_qops/interop/ggml.py", "xla_qops/interop/_core.py",
                "xla_qops/interop/compressed_tensors.py", "torch_bridge/load.py",
                "torch_bridge/checkpoint.py"]
HUGE = 1 << 40  # elements: a shape no test file holds


# ------------------------------------------------------------------ helpers

def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def expect_clean_refusal(load, path: pathlib.Path, tensor: str | None = None,
                         may_load: bool = False):
    """Runs `load()`: a ValueError naming `path` (and `tensor`), or, with
    `may_load`, success; allocating at most twice the file's size + 1 MiB."""
    size = path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.iterdir())
    tracemalloc.start()
    try:
        load()
    except ValueError as e:
        message = str(e)
        assert path.name in message, f"the error does not name the file: {message}"
        if tensor is not None:
            assert tensor in message, f"the error does not name {tensor!r}: {message}"
    else:
        assert may_load, f"{path.name}: loaded without an error"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= 2 * size + (1 << 20), f"{path.name}: {peak} bytes allocated for {size}"


def truncations(n: int) -> list[int]:
    return sorted({0, 4, 7, 8, 9, 20, n // 3, n // 2, n - 17, n - 1} - {n})


# ------------------------------------------------------------------ our own format

@pytest.fixture(scope="module")
def own_file(tmp_path_factory) -> pathlib.Path:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    path = tmp_path_factory.mktemp("own") / "model.safetensors"
    checkpoint.save_quantized(path, {
        "layers.0": xla_qops.quantize_weight(w, bits=4, block_size=32, symmetric=False),
        "layers.1": xla_qops.quantize_weight(w, format="fp8")},
        {"norm.weight": np.ones(64, np.float32)})
    return path


def own_loaders(path):
    """Every loader of our format, on `path`."""
    loaders = [lambda: checkpoint.load_quantized(path),
               lambda: checkpoint.load_state_dict(path)]
    if HAVE_TORCH:
        from torch_bridge.checkpoint import load_torch
        loaders.append(lambda: load_torch(path))
    return loaders


def test_own_file_loads(own_file):
    """The untouched file loads with every loader (so each refusal below is the
    mutation's doing)."""
    for load in own_loaders(own_file):
        load()


def truncated_copy(path, tmp_path, cut: int):
    """A copy of `path` in `tmp_path` cut at the `cut`-th of its `truncations`."""
    raw = path.read_bytes()
    at = truncations(len(raw))[cut]
    copy = tmp_path / f"cut{at}{path.suffix}"
    copy.write_bytes(raw[:at])
    return copy


@pytest.mark.parametrize("cut", range(10))
def test_own_file_truncated(own_file, tmp_path, cut):
    path = truncated_copy(own_file, tmp_path, cut)
    for load in own_loaders(path):
        expect_clean_refusal(load, path)


def lies(header: dict, data: bytes):
    """(what, tensor, header, data) of files whose header lies about one tensor."""
    name = "layers.0.weight"
    entry = header[name]
    start, end = entry["data_offsets"]

    def changed(**fields):
        h = json.loads(json.dumps(header))
        h[name].update(fields)
        return h

    yield "huge shape", name, changed(shape=[HUGE, HUGE]), data
    yield "shape of more elements", name, changed(shape=[entry["shape"][0] * 2,
                                                         *entry["shape"][1:]]), data
    yield "negative dim", name, changed(shape=[-1, *entry["shape"][1:]]), data
    yield "offsets past the end", name, changed(data_offsets=[start, len(data) + 4096]), data
    yield "offsets reversed", name, changed(data_offsets=[end, start]), data
    yield "huge offsets", name, changed(data_offsets=[HUGE, HUGE + end - start]), data
    yield "wider dtype", name, changed(dtype="I64" if entry["dtype"] == "I32" else "I32"), data
    yield "unknown dtype", name, changed(dtype="Q7"), data
    yield "offsets not a pair", name, changed(data_offsets="0-10"), data
    yield "shape not a list", name, changed(shape=7), data
    yield "entry not an object", name, {**header, name: [1, 2]}, data
    yield "data shorter than the header says", None, header, data[:-64]


@pytest.mark.parametrize("lie", range(12))
def test_own_file_lying_header(own_file, tmp_path, lie):
    header, data = split_safetensors(own_file.read_bytes())
    what, tensor, header, data = list(lies(header, data))[lie]
    path = tmp_path / "lying.safetensors"
    path.write_bytes(join_safetensors(header, data))
    for load in own_loaders(path):
        expect_clean_refusal(load, path, tensor)


@pytest.mark.parametrize("length", [0, 3, 1 << 30, (1 << 64) - 1])
def test_header_length_lies(own_file, tmp_path, length):
    raw = own_file.read_bytes()
    path = tmp_path / "length.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw[8:])
    for load in own_loaders(path):
        expect_clean_refusal(load, path)
    expect_clean_refusal(lambda: read_safetensors(path), path)


def test_own_file_bit_flips(own_file, tmp_path):
    """Single-bit flips across the header (and a few in the data): each file
    loads (a flip in a tensor's bytes or a name) or is refused cleanly."""
    raw = bytearray(own_file.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    rng = np.random.default_rng(0)
    positions = sorted(set(rng.integers(0, 8 + length, 40).tolist())
                       | set(rng.integers(8 + length, len(raw), 4).tolist()))
    for position in positions:
        flipped = bytearray(raw)
        flipped[position] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"flip{position}.safetensors"
        path.write_bytes(bytes(flipped))
        for load in own_loaders(path):
            expect_clean_refusal(load, path, may_load=True)


def test_metadata_schemes_contradict_the_tensors(own_file, tmp_path):
    """The file's own scheme metadata lies (bits, block size, features)."""
    header, data = split_safetensors(own_file.read_bytes())
    schemes = json.loads(header["__metadata__"][checkpoint.SCHEMES_KEY])
    for field, value in (("bits", 8), ("block_size", 16), ("in_features", 4096),
                         ("packed", False)):
        lying = json.loads(json.dumps(schemes))
        lying["layers.0"][field] = value
        h = {**header, "__metadata__": {**header["__metadata__"],
                                        checkpoint.SCHEMES_KEY: json.dumps(lying)}}
        path = tmp_path / f"scheme-{field}.safetensors"
        path.write_bytes(join_safetensors(h, data))
        for load in own_loaders(path):
            expect_clean_refusal(load, path, "layers.0")
    h = {**header, "__metadata__": {**header["__metadata__"],
                                    checkpoint.SCHEMES_KEY: "{not json"}}
    path = tmp_path / "scheme-garbage.safetensors"
    path.write_bytes(join_safetensors(h, data))
    for load in own_loaders(path):
        expect_clean_refusal(load, path)


# ------------------------------------------------------------------ compressed-tensors

CT_CONFIG = {"quantization_config": {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized",
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": 32}}}}}


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory) -> pathlib.Path:
    from safetensors.numpy import save_file
    rng = np.random.default_rng(1)
    directory = tmp_path_factory.mktemp("ct")
    tensors = {}
    for i, (out, k) in enumerate(((48, 64), (64, 64))):
        qw = xla_qops.quantize_weight(rng.standard_normal((out, k)).astype(np.float32),
                                      bits=4, block_size=32)
        layer = interop.to_compressed_tensors(qw)
        tensors.update({f"layers.{i}.{name}": np.ascontiguousarray(v)
                        for name, v in layer.tensors.items()})
    tensors["norm.weight"] = np.ones(64, np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(CT_CONFIG))
    return directory


def copy_ct(ct_dir, tmp_path, raw=None, config=None) -> pathlib.Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.safetensors").write_bytes(
        raw if raw is not None else (ct_dir / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(
        config if config is not None else (ct_dir / "config.json").read_text())
    return tmp_path


def test_compressed_tensors_loads(ct_dir):
    assert sorted(interop.read_checkpoint(ct_dir).weights) == ["layers.0", "layers.1"]


@pytest.mark.parametrize("cut", range(10))
def test_compressed_tensors_truncated(ct_dir, tmp_path, cut):
    raw = (ct_dir / "model.safetensors").read_bytes()
    at = truncations(len(raw))[cut]
    source = copy_ct(ct_dir, tmp_path, raw[:at])
    expect_clean_refusal(lambda: interop.read_checkpoint(source), source / "model.safetensors")


@pytest.mark.parametrize("lie", range(12))
def test_compressed_tensors_lying_header(ct_dir, tmp_path, lie):
    header, data = split_safetensors((ct_dir / "model.safetensors").read_bytes())
    header["layers.0.weight"] = header.pop("layers.0.weight_packed")
    what, tensor, header, data = list(lies(header, data))[lie]
    header["layers.0.weight_packed"] = header.pop("layers.0.weight")
    source = copy_ct(ct_dir, tmp_path, join_safetensors(header, data))
    expect_clean_refusal(lambda: interop.read_checkpoint(source), source / "model.safetensors",
                         tensor and "layers.0.weight_packed")


@pytest.mark.parametrize("what, change", [
    ("bits", {"num_bits": 8}),
    ("group size", {"group_size": 16}),
    ("strategy", {"strategy": "channel"}),
    ("type", {"type": "float"}),
    ("asymmetric without zero points", {"symmetric": False}),
])
def test_config_contradicts_the_tensors(ct_dir, tmp_path, what, change):
    config = json.loads(json.dumps(CT_CONFIG))
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    source = copy_ct(ct_dir, tmp_path, config=json.dumps(config))
    expect_clean_refusal(lambda: interop.read_checkpoint(source), source, "layers.")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"quantization_config": 7}'])
def test_config_json_garbage(ct_dir, tmp_path, text):
    source = copy_ct(ct_dir, tmp_path, config=text)
    expect_clean_refusal(lambda: interop.read_checkpoint(source), source / "config.json")


@pytest.mark.torch
def test_torch_model_untouched_by_a_refused_load(ct_dir, tmp_path):
    import torch

    import torch_bridge

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 48, bias=False),
                                               torch.nn.Linear(64, 64, bias=False)])
            self.norm = torch.nn.LayerNorm(64, bias=False)

    torch.manual_seed(0)
    model = Tiny()
    torch_bridge.load_quantized(Tiny(), ct_dir)  # the untouched checkpoint loads
    before = {k: v.clone() for k, v in model.state_dict().items()}
    header, data = split_safetensors((ct_dir / "model.safetensors").read_bytes())
    header["layers.1.weight_packed"]["shape"] = [HUGE, 8]
    bad_config = json.loads(json.dumps(CT_CONFIG))
    bad_config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    sources = [copy_ct(ct_dir, tmp_path / "lying", join_safetensors(header, data)),
               copy_ct(ct_dir, tmp_path / "config", config=json.dumps(bad_config)),
               copy_ct(ct_dir, tmp_path / "cut",
                       (ct_dir / "model.safetensors").read_bytes()[:-100])]
    for source in sources:
        expect_clean_refusal(lambda: torch_bridge.load_quantized(model, source), source)
        after = model.state_dict()
        assert sorted(after) == sorted(before)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(isinstance(m, torch_bridge.XlaQuantizedLinear) for m in model.modules())


# ------------------------------------------------------------------ GGUF

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> pathlib.Path:
    import gguf  # a test dependency of every stack (requirements*.txt)
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    blocks = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32),
                                  gguf.GGMLQuantizationType.Q8_0)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_q.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_loads(gguf_file):
    weights, others, _ = interop.read_gguf(gguf_file)
    assert list(weights) == ["blk.0.attn_q.weight"] and list(others) == ["output_norm.weight"]


@pytest.mark.parametrize("cut", range(10))
def test_gguf_truncated(gguf_file, tmp_path, cut):
    path = truncated_copy(gguf_file, tmp_path, cut)
    expect_clean_refusal(lambda: interop.read_gguf(path), path)


def tensor_info_offset(raw: bytes, name: str) -> int:
    """Where the fields after tensor `name`'s name begin (n_dims: uint32)."""
    encoded = name.encode()
    return raw.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


@pytest.mark.parametrize("what", ["huge dims", "more dims", "unknown type", "offset past end",
                                  "huge offset", "n_dims"])
def test_gguf_lying_tensor_info(gguf_file, tmp_path, what):
    raw = bytearray(gguf_file.read_bytes())
    name = "blk.0.attn_q.weight"
    at = tensor_info_offset(bytes(raw), name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    dims_at, type_at = at + 4, at + 4 + 8 * n_dims
    offset_at = type_at + 4
    if what == "huge dims":
        struct.pack_into("<QQ", raw, dims_at, 1 << 40, 1 << 40)
    elif what == "more dims":
        struct.pack_into("<Q", raw, dims_at + 8, 64)
    elif what == "unknown type":
        struct.pack_into("<I", raw, type_at, 250)
    elif what == "offset past end":
        struct.pack_into("<Q", raw, offset_at, len(raw))
    elif what == "huge offset":
        struct.pack_into("<Q", raw, offset_at, 1 << 62)
    else:
        struct.pack_into("<I", raw, at, 1 << 30)
    path = tmp_path / "lying.gguf"
    path.write_bytes(bytes(raw))
    expect_clean_refusal(lambda: interop.read_gguf(path), path)


def test_gguf_bit_flips(gguf_file, tmp_path):
    raw = gguf_file.read_bytes()
    rng = np.random.default_rng(3)
    header_end = tensor_info_offset(raw, "output_norm.weight") + 64
    for position in sorted(set(rng.integers(0, header_end, 40).tolist())):
        flipped = bytearray(raw)
        flipped[position] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"flip{position}.gguf"
        path.write_bytes(bytes(flipped))
        expect_clean_refusal(lambda: interop.read_gguf(path), path, may_load=True)


# ------------------------------------------------------------------ no pickle

PICKLE_CALLS = {"pickle.load", "pickle.loads", "torch.load", "np.load", "numpy.load",
                "pickle.Unpickler", "marshal.loads", "dill.load", "joblib.load"}


def test_load_modules_use_no_pickle():
    """An AST scan: no load module imports pickle (or marshal, dill, joblib) or
    calls torch.load / numpy.load, which unpickle."""
    found = []
    for rel in LOAD_MODULES:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "marshal", "dill", "joblib", "cloudpickle")
                       for n in names):
                    found.append(f"{rel}:{node.lineno} imports {names}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if f"{node.value.id}.{node.attr}" in PICKLE_CALLS:
                    found.append(f"{rel}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, found


def test_loads_never_unpickle(monkeypatch, own_file, ct_dir, gguf_file):
    """Every loader succeeds with pickle.load(s), numpy.load and torch.load
    made to fail: nothing in a load path unpickles."""
    def refuse(*args, **kwargs):
        raise AssertionError("a load path unpickled")

    class Refusing(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    monkeypatch.setattr(np, "load", refuse)
    if HAVE_TORCH:
        import torch
        monkeypatch.setattr(torch, "load", refuse)
    for load in own_loaders(own_file):
        load()
    interop.read_checkpoint(ct_dir)
    interop.read_gguf(gguf_file)
    if HAVE_TORCH:
        import torch

        import torch_bridge
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([torch.nn.Linear(64, 48, bias=False),
                                            torch.nn.Linear(64, 64, bias=False)])
        model.norm = torch.nn.LayerNorm(64, bias=False)
        torch_bridge.load_quantized(model, ct_dir)
