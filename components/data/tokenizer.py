"""Tokenizer stage: byte-level BPE (HF tokenizers) trained on the train split, wrapped for transformers.

Byte-level with no normalizer and no prefix space, so decode(encode(x)) == x for any text (code,
unicode, odd whitespace). Whitespace runs are split off as their own pieces (see CODE_SPLIT), so an
identifier is the same token after a space, a backtick or a dot -- copying a name is plain induction. The chat template turns messages into role-tagged turns; SFT, DPO,
evaluation and serving all build prompts through `format_prompt` so their formats cannot diverge.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from components.config import Settings
from components.data import layout
from components.data.io import read_jsonl, remove_dirs, replace_dirs, temp_dir_for
from components.errors import ConfigError, DataError

# Pre-tokenizer pieces: whitespace runs, words (identifiers, numbers), punctuation runs.
CODE_SPLIT = r"\s+|\w+|[^\w\s]+"

# Each message: "<|role|>\n{content}<|end|>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- set tags = {'system': '" + layout.SYSTEM + "', 'user': '" + layout.USER + "', 'assistant': '"
    + layout.ASSISTANT + "'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in tags -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{- tags[message['role']] + '\\n' + message['content'] + '" + layout.END_OF_TURN + "\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + layout.ASSISTANT + "\\n' -}}{%- endif -%}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None):
    """Train a raw `tokenizers.Tokenizer` (byte-level BPE, special tokens first: EOT has id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tokenizers import Regex

    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer glues a leading space to the word (" tell" != "tell"), so a name in a
    # prompt ("`tell(self)`") and in code ("def tell(self)") would be different tokens. Splitting
    # whitespace, words and punctuation apart costs ~20% more tokens on code (3.0 vs 3.6 chars per
    # token on the stdlib) and makes identifiers tokenize the same wherever they stand.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CODE_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(layout.SPECIAL_TOKENS),
        # All 256 byte symbols up front: any input stays encodable even if a byte never occurred.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def wrap(tok):
    """A transformers PreTrainedTokenizerFast around a trained `tokenizers.Tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=layout.EOT,
        pad_token=layout.PAD,
        bos_token=None,
        extra_special_tokens=[t for t in layout.SPECIAL_TOKENS if t not in (layout.EOT, layout.PAD)],
        chat_template=CHAT_TEMPLATE,
        # Code must round-trip exactly: no space clean-up on decode, no length warnings.
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000_000,
    )


def load_tokenizer(path_or_settings: str | Path | Settings):
    """The trained tokenizer (PreTrainedTokenizerFast) from a directory or from the settings' layout."""
    from transformers import PreTrainedTokenizerFast

    path = layout.tokenizer_dir(path_or_settings) if isinstance(path_or_settings, Settings) else Path(path_or_settings)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"no tokenizer at {path}: run `llmcycle data tokenizer` first")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def format_prompt(tokenizer, prompt: str) -> str:
    """The text a model continues to answer `prompt`: one user turn plus the opened assistant turn."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)


def format_pair(tokenizer, prompt: str, response: str) -> str:
    """A complete user/assistant exchange, as SFT trains on it (the response closes with END_OF_TURN)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)


def train_texts(settings: Settings) -> list[str]:
    """Train-split documents of the corpus, in corpus order, capped at tokenizer.max_train_chars."""
    corpus = layout.corpus_path(settings)
    if not corpus.is_file():
        raise ConfigError(f"no corpus at {corpus}: run `llmcycle data ingest` first")
    cap = settings.tokenizer.max_train_chars
    texts: list[str] = []
    total = 0
    for _, row in read_jsonl(corpus):
        if row.get("split") != "train":
            continue
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(f"{corpus}: document {row.get('id')!r} has no text")
        if cap is not None and total + len(text) > cap:
            # Cut the last document rather than skip it, so the cap is met exactly.
            text = text[: cap - total]
        if text:
            texts.append(text)
            total += len(text)
        if cap is not None and total >= cap:
            break
    if not texts:
        raise DataError(f"{corpus}: the train split is empty; nothing to train the tokenizer on")
    return texts


def run(settings: Settings) -> dict:
    """Train the tokenizer on the train split and save it to data/processed/tokenizer (atomically)."""
    t0 = time.perf_counter()
    texts = train_texts(settings)
    tok = train_bpe(iter(texts), settings.tokenizer.vocab_size, settings.tokenizer.min_frequency, len(texts))
    t_train = time.perf_counter() - t0
    fast = wrap(tok)
    final = layout.tokenizer_dir(settings)
    tmp = temp_dir_for(final)
    try:
        fast.save_pretrained(str(tmp))
        replace_dirs({tmp: final})
    except BaseException:
        remove_dirs([tmp])
        raise
    return {
        "path": str(final),
        "vocab_size": len(fast),
        "requested_vocab_size": settings.tokenizer.vocab_size,
        "train_documents": len(texts),
        "train_chars": sum(len(t) for t in texts),
        "eot_id": fast.eos_token_id,
        "pad_id": fast.pad_token_id,
        "seconds_train": round(t_train, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _chunks(texts: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(texts), size):
        yield texts[i:i + size]


def encode_many(tokenizer, texts: list[str], specials_as_text: bool = True, batch: int = 256) -> list[list[int]]:
    """Token ids of many texts via the Rust backend's encode_batch. By default special-token strings
    inside the texts (a document quoting "<|endoftext|>") are encoded as plain text, never as control
    ids; pass specials_as_text=False for text rendered by the chat template."""
    backend = tokenizer.backend_tokenizer
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = specials_as_text
    try:
        out: list[list[int]] = []
        for chunk in _chunks(texts, batch):
            out.extend(e.ids for e in backend.encode_batch(chunk, add_special_tokens=False))
        return out
    finally:
        backend.encode_special_tokens = previous
