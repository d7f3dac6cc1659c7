"""Build or load the project's causal LM: a Hugging Face LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, sdpa).

Every stage gets its model here, from scratch (shape from config.resolve_model_shape and the data
stage's tokenizer), from a local save_pretrained folder, or from an MLflow URI (models:/name@alias,
runs:/id/model). Compromise: one architecture only, so checkpoints stay plain HF and any tool loads them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from components import tracking
from components.config import Settings, resolve_model_shape
from components.data import layout
from components.errors import ConfigError

ROPE_THETA = 10_000.0


def special_ids(tokenizer: Any) -> dict[str, int | None]:
    """pad / bos / eos ids the model config must agree with (EOT doubles as BOS: it starts every document)."""
    eot = tokenizer.convert_tokens_to_ids(layout.EOT)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(layout.PAD)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eot
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return {"pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos}


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generation: end of document and end of a chat turn (those the vocab has)."""
    ids = []
    for tok in (layout.EOT, layout.END_OF_TURN):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is not None and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def build_model(shape: dict, tokenizer: Any = None) -> Any:
    """A freshly initialised LlamaForCausalLM of the given shape (n_layer, n_head, n_embd, block_size,
    intermediate_size, vocab_size); input and output embeddings tied; special ids from the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = special_ids(tokenizer) if tokenizer is not None else {"pad_token_id": None, "bos_token_id": None,
                                                                 "eos_token_id": None}
    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["n_embd"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["n_layer"], num_attention_heads=shape["n_head"],
        max_position_embeddings=shape["block_size"], rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attn_implementation="sdpa", **ids,
    )
    model = LlamaForCausalLM(config)
    if tokenizer is not None:
        # generate() stops at either end marker unless told otherwise; saved with the model.
        model.generation_config.eos_token_id = stop_token_ids(tokenizer)
        model.generation_config.pad_token_id = ids["pad_token_id"]
    return model


def count_parameters(model: Any, trainable_only: bool = False) -> int:
    """Number of parameters; tied tensors (embedding = lm_head) are counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


# ----------------------------------------------------------------------------- loading
def data_tokenizer(settings: Settings) -> Any:
    """The tokenizer the data stage trained (data/processed/tokenizer); ConfigError when missing."""
    from components.data.tokenizer import load_tokenizer

    return load_tokenizer(settings)


def _tokenizer_near(model_dir: Path) -> Path | None:
    """Where a tokenizer was saved with a model: beside it, or in MLflow's components/tokenizer."""
    for candidate in (model_dir, model_dir.parent / "components" / "tokenizer", model_dir / "components" / "tokenizer"):
        if (candidate / "tokenizer.json").exists():
            return candidate
    return None


def _resolve_source(settings: Settings, init_from: str) -> Path:
    """A local folder holding config.json for a path or MLflow URI; ConfigError when it does not exist."""
    if init_from.startswith(("models:/", "runs:/")):
        try:
            return tracking.download_model_dir(settings, init_from)
        except Exception as exc:  # MlflowException, FileNotFoundError, OSError: all mean "no such model"
            raise ConfigError(f"model.init_from: {init_from!r} could not be loaded from MLflow "
                              f"({tracking.tracking_uri(settings)}): {str(exc).splitlines()[0][:200]}") from None
    path = settings.path(init_from)
    if not path.exists():
        raise ConfigError(f"model.init_from: {init_from!r} does not exist (looked at {path}); "
                          "use scratch, a save_pretrained folder or models:/<name>@<alias>")
    if not (path / "config.json").exists():
        raise ConfigError(f"model.init_from: {path} has no config.json (not a save_pretrained folder)")
    return path


def check_compatible(model: Any, tokenizer: Any, source: str) -> None:
    """The tokenizer must fit the embedding table and agree on the special ids."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(f"model.init_from={source}: tokenizer has {len(tokenizer)} tokens but the model's "
                          f"embedding has {rows} rows; retrain from scratch or use the model's own tokenizer")
    ids = special_ids(tokenizer)
    for key, tok_id in ids.items():
        model_id = getattr(model.config, key, None)
        if isinstance(model_id, list):
            model_id = model_id[0] if model_id else None
        if model_id is not None and tok_id is not None and model_id != tok_id:
            raise ConfigError(f"model.init_from={source}: {key} is {model_id} in the model but {tok_id} in the "
                              f"tokenizer (vocab sizes: model {rows}, tokenizer {len(tokenizer)})")


def load_causal_lm(settings: Settings, init_from: str | None = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for init_from (default settings.model.init_from): scratch | folder | MLflow URI.

    A given tokenizer wins; otherwise the one saved with the model, else the data stage's.
    """
    source = init_from or settings.model.init_from
    if source == "scratch":
        tokenizer = tokenizer if tokenizer is not None else data_tokenizer(settings)
        model = build_model(resolve_model_shape(settings, vocab_size=len(tokenizer)), tokenizer)
        return model, tokenizer

    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = _resolve_source(settings, source)
    model = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True, attn_implementation="sdpa")
    if tokenizer is None:
        tok_dir = _tokenizer_near(folder)
        tokenizer = (AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True) if tok_dir
                     else data_tokenizer(settings))
    check_compatible(model, tokenizer, source)
    return model, tokenizer
