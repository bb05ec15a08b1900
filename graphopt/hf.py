"""Hugging Face causal LMs as the CLI loads them: a local model folder (``save_pretrained``'s
``config.json`` plus safetensors weights), or any architecture of the installed
``transformers`` built from its config with random weights.  Nothing is ever downloaded.

The model is wrapped in :class:`graphopt.models.Logits`: ``forward(input_ids) -> logits``
without a KV cache, the one-tensor-in, one-tensor-out form that ``torch.export`` and a server want.
Every problem a user can cause (not a folder, no ``config.json``, a missing weight file, an
unknown architecture) is a :class:`~graphopt.errors.GraphoptError` of one line.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch

from .errors import GraphoptError, first_line
from .models import Logits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise GraphoptError("Hugging Face models need transformers (pip install 'graphopt[hf]')") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()   # graphopt's own display says "load"
    return transformers


def check_folder(path) -> Path:
    """The folder, when it looks like a saved causal LM; else a one-line error naming the problem."""
    p = Path(path)
    if not p.exists():
        raise GraphoptError(f"{path}: no such file or directory")
    if not p.is_dir():
        raise GraphoptError(f"{path}: not a directory")
    config = p / "config.json"
    if not config.is_file():
        raise GraphoptError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraphoptError(f"{config}: not valid JSON ({e})") from None
    present = [name for name in WEIGHT_FILES if (p / name).is_file()]
    if not present:
        raise GraphoptError(f"{path}: no weight file ({', '.join(WEIGHT_FILES[::2])} or a sharded index)")
    for index in (n for n in present if n.endswith(".index.json")):
        try:
            shards = set(json.loads((p / index).read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise GraphoptError(f"{p / index}: not a weight index ({type(e).__name__}: {e})") from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise GraphoptError(f"{path}: weight file {missing[0]} (listed in {index}) is missing")
    return p


def load_folder(path, dtype: torch.dtype = torch.float32) -> Logits:
    """A causal LM from a local folder, with eager attention (what graphopt fuses), in eval mode."""
    p = check_folder(path)
    tf = _transformers()
    try:
        lm, info = tf.AutoModelForCausalLM.from_pretrained(
            str(p), local_files_only=True, attn_implementation="eager", dtype=dtype, output_loading_info=True)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds: one line for each)
        first = first_line(e, type(e).__name__)
        raise GraphoptError(f"{path}: cannot load the model ({type(e).__name__}: {first})") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise GraphoptError(f"{path}: the weight files lack {len(missing)} tensor(s) of the model, "
                            f"e.g. {missing[0]}")
    return Logits(lm.eval())


def causal_lm_names() -> list:
    """The architectures (config ``model_type``) the installed transformers can build as causal LMs."""
    _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def from_config(name: str, layers: int | None = 2, dtype: torch.dtype = torch.float32,
                overrides: dict | None = None) -> Logits:
    """An architecture built from its default config with random weights; ``layers`` (default 2)
    shrinks it, since default configs are full-size models, and ``overrides`` sets other config
    fields (``{"hidden_size": 256}``)."""
    tf = _transformers()
    names = causal_lm_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" ({len(names)} known: graphopt optimize --config list)"
        raise GraphoptError(f"--config {name}: not a causal-LM architecture of transformers "
                            f"{tf.__version__}{hint}")
    try:
        config = tf.AutoConfig.for_model(name)
        for key, value in (overrides or {}).items():
            if not hasattr(config, key):
                raise GraphoptError(f"--set {key}: {type(config).__name__} has no field {key!r}")
            setattr(config, key, value)
        if layers is not None:
            _set_layers(config, layers)
        lm = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    except GraphoptError:
        raise
    except Exception as e:  # noqa: BLE001
        first = first_line(e, type(e).__name__)
        raise GraphoptError(f"--config {name}: cannot build the model ({type(e).__name__}: {first})") from None
    return Logits(lm.eval())


def _set_layers(config, layers: int) -> None:
    """Set the number of layers, wherever this architecture keeps it (a text sub-config too)."""
    if layers < 1:
        raise GraphoptError(f"--layers must be >= 1, got {layers}")
    targets = [config] + [getattr(config, k) for k in ("text_config", "decoder") if hasattr(config, k)]
    done = False
    for c in targets:
        if hasattr(c, "num_hidden_layers"):
            c.num_hidden_layers = layers
            done = True
            for key in ("layer_types", "block_types"):   # per-layer lists must keep the new length
                value = getattr(c, key, None)
                if isinstance(value, (list, tuple)) and len(value) > layers:
                    setattr(c, key, type(value)(value[:layers]))
    if not done:
        raise GraphoptError(f"{type(config).__name__}: cannot set the number of layers")


def example_ids(model: Logits, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Random token ids of shape (batch, seq_len) within the model's vocabulary."""
    if batch < 1 or seq_len < 1:
        raise GraphoptError(f"--batch and --seq-len must be >= 1, got {batch} and {seq_len}")
    config = model.model.config
    vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None) or 2
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        raise GraphoptError(f"--seq-len {seq_len} is longer than the model's {limit} positions")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=gen)


__all__ = ["DTYPES", "check_folder", "load_folder", "from_config", "causal_lm_names",
           "example_ids"]
