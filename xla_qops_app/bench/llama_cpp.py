"""llama.cpp as a peer of the decoder benchmark (never a dependency).

`scripts/ensure_llama_cpp.sh` builds llama-cpp-python from PyPI for this CPU
(``-DGGML_NATIVE=ON``) into ``build/llama_cpp/site`` and unpacks the llama.cpp
sources it ships (``convert_hf_to_gguf.py``, ``gguf-py``) into
``build/llama_cpp/src``; nothing is installed into a project environment.
Here the benchmark:

* converts the benchmark's random-weight HF model with llama.cpp's own
  ``convert_hf_to_gguf.py`` (bf16, lossless from the bf16 model) -- with the
  vocabulary step replaced by llama.cpp's "no vocab" form, as the random model
  has no tokenizer and token ids go in directly;
* quantizes it with ``llama_model_quantize`` to Q4_0 and Q8_0, llama.cpp's
  default mixtures for those types (what ``llama-quantize`` writes);
* generates greedily through the C API (``llama_decode`` on token-id batches),
  2 threads, one sequence per prompt row, timing prefill and every decode
  step as the other generators do (`decoder` wraps the figures in its `Timing`).

Note that llama.cpp's Q4_0 and Q8_0 arithmetic quantizes each activation
vector to int8 blocks and runs integer dot products (W4A8 / W8A8 in this
project's terms).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "build", "llama_cpp")
# XLA_QOPS_LLAMA_CPP: where ensure_llama_cpp.sh put it, if not build/llama_cpp.
HOME = os.environ.get("XLA_QOPS_LLAMA_CPP", ROOT)
SITE, SOURCE = os.path.join(HOME, "site"), os.path.join(HOME, "src")
QUANT_TYPES = ("Q4_0", "Q8_0")
THREADS = 2


@functools.cache
def unavailable() -> str | None:
    """None if llama.cpp can run here, else why not (the benchmark says so)."""
    if not os.path.exists(os.path.join(SOURCE, "convert_hf_to_gguf.py")):
        return (f"llama.cpp is not installed ({SOURCE} has no convert_hf_to_gguf.py); "
                "scripts/ensure_llama_cpp.sh builds it (about 4 minutes)")
    try:
        _llama_cpp()
    except Exception as e:  # noqa: BLE001  any load failure means: not available
        return f"llama_cpp does not import from {SITE} ({type(e).__name__}: {e})"[:300]
    return None


@functools.cache
def _llama_cpp():
    if SITE not in sys.path:
        sys.path.append(SITE)
    import llama_cpp
    llama_cpp.llama_backend_init()
    # Silence llama.cpp's loading log (it writes every tensor's name to stderr).
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
    return llama_cpp


def _quiet(level, text, user_data):
    return None


_QUIET = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(_quiet)

# convert_hf_to_gguf.py run as llama.cpp ships it, but for the vocabulary: the
# random model has no tokenizer, so the GGUF gets llama.cpp's "no vocab" form
# (tokenizer model "none" with the vocab size), which llama_decode accepts.
_CONVERT = r"""
import sys
source, model_dir, out = sys.argv[1:4]
sys.path[:0] = [source]
import convert_hf_to_gguf
from conversion import get_model_class

def no_vocab(self):
    self.gguf_writer.add_tokenizer_model("none")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

get_model_class("LlamaForCausalLM").set_vocab = no_vocab
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "bf16"]
convert_hf_to_gguf.main()
"""


def convert(model, folder: str) -> dict[str, str]:
    """The torch HF `model` as GGUF files in `folder`: {quant type: path}."""
    ll = _llama_cpp()
    hf_dir = os.path.join(folder, "hf")
    model.save_pretrained(hf_dir)
    bf16 = os.path.join(folder, "model-bf16.gguf")
    proc = subprocess.run([sys.executable, "-c", _CONVERT, SOURCE, hf_dir, bf16],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {proc.stderr[-2000:]}")
    paths = {}
    for kind in QUANT_TYPES:
        params = ll.llama_model_quantize_default_params()
        params.ftype = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.nthread = THREADS
        out = os.path.join(folder, f"model-{kind}.gguf")
        if ll.llama_model_quantize(bf16.encode(), out.encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed")
        paths[kind] = out
    return paths


def step_bytes(path: str) -> int:
    """Bytes one decode step reads: every tensor of the GGUF file but the token
    embeddings (a step reads one row per token)."""
    from gguf import GGUFReader
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


class Generator:
    """Greedy generation by llama.cpp from a GGUF file."""

    def __init__(self, path: str, prompt: np.ndarray, decode: int, vocab: int):
        ll = self.ll = _llama_cpp()
        self.prompt, self.decode, self.vocab = prompt, decode, vocab
        self.model = ll.llama_model_load_from_file(path.encode(), ll.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        batch, n = prompt.shape
        params = ll.llama_context_default_params()
        params.n_ctx = batch * (n + decode)
        params.n_batch = params.n_ubatch = batch * n
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = THREADS
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.batch = ll.llama_batch_init(batch * n, 0, 1)

    def _fill(self, tokens, positions):
        """The batch of `tokens` [b, t] at `positions` [t], logits of the last of each row."""
        b, t = tokens.shape
        batch = self.batch
        batch.n_tokens = b * t
        for row in range(b):
            for j in range(t):
                i = row * t + j
                batch.token[i] = int(tokens[row, j])
                batch.pos[i] = int(positions[j])
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = row
                batch.logits[i] = j == t - 1
        if self.ll.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, row * t + t - 1),
                                      shape=(self.vocab,)) for row in range(b)]
        return np.array([r.argmax() for r in rows], np.int32)[:, None]

    def __call__(self):
        """(prefill seconds, seconds per decode step, tokens [batch, decode])."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        n = self.prompt.shape[1]
        start = time.perf_counter()
        token = self._fill(self.prompt, range(n))
        first = time.perf_counter()
        tokens = [token]
        for i in range(self.decode - 1):
            token = self._fill(token, [n + i])
            tokens.append(token)
        end = time.perf_counter()
        return first - start, (end - first) / (self.decode - 1), np.concatenate(tokens, 1)

    def __del__(self):
        ll = getattr(self, "ll", None)
        if ll is None:
            return
        if getattr(self, "batch", None) is not None:
            ll.llama_batch_free(self.batch)
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)


_converted: dict = {}


def gguf_files(model) -> dict[str, str]:
    """`convert` of the benchmark's model, once per model and process."""
    if id(model) not in _converted:
        # The GGUF files are gigabytes; they go when the process does.
        directory = tempfile.mkdtemp(prefix="xla_qops_gguf_")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _converted[id(model)] = (model, convert(model, directory))
    return _converted[id(model)][1]
