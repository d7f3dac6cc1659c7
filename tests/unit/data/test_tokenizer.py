"""Tokenizer stage: BPE trained on the train split, exact round-trip, special tokens, chat template."""
from __future__ import annotations

import pytest

from components.data import ingest, layout, tokenizer
from components.errors import ConfigError

CODE = 'def f(x):\n    return "héllo ✓ 世界"\n\t\r\n  # trailing  \n'


@pytest.fixture
def trained(tiny_settings):
    ingest.run(tiny_settings)
    stats = tokenizer.run(tiny_settings)
    return tiny_settings, stats, tokenizer.load_tokenizer(tiny_settings)


def test_round_trip_and_special_tokens(trained):
    s, stats, tok = trained
    assert stats["vocab_size"] == len(tok) <= 400
    assert tok.decode(tok.encode(CODE)) == CODE
    assert tok.decode(tokenizer.encode_many(tok, [CODE])[0]) == CODE
    ids = tok.convert_tokens_to_ids(layout.SPECIAL_TOKENS)
    assert ids == list(range(len(layout.SPECIAL_TOKENS)))       # special tokens come first
    assert tok.eos_token == layout.EOT and tok.eos_token_id == ids[0] == stats["eot_id"]
    assert tok.pad_token == layout.PAD and tok.pad_token_id == ids[1] == stats["pad_id"]
    assert tok.bos_token is None
    for t in layout.SPECIAL_TOKENS:     # each is one id in rendered (template) text
        assert tok.encode(f"a{t}b").count(tok.convert_tokens_to_ids(t)) == 1
    # Corpus text that quotes a special token is encoded as plain text (no control ids).
    quoted = tokenizer.encode_many(tok, [f"x = '{layout.EOT}'"])[0]
    assert tok.eos_token_id not in quoted and tok.decode(quoted) == f"x = '{layout.EOT}'"


def test_chat_template_and_format_prompt(trained):
    _, _, tok = trained
    assert tokenizer.format_prompt(tok, "Write f") == "<|user|>\nWrite f<|end|>\n<|assistant|>\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "def f():\n    pass"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\ndef f():\n    pass<|end|>\n")
    assert tokenizer.format_pair(tok, "p", "r") == "<|user|>\np<|end|>\n<|assistant|>\nr<|end|>\n"
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_saved_atomically_and_loadable_by_path(trained):
    s, stats, tok = trained
    final = layout.tokenizer_dir(s)
    assert (final / "tokenizer.json").is_file()
    assert [p.name for p in final.parent.iterdir()] == ["tokenizer"]      # no temp dirs left
    again = tokenizer.load_tokenizer(final)
    assert again.encode(CODE) == tok.encode(CODE) and again.chat_template == tokenizer.CHAT_TEMPLATE
    tokenizer.run(s)                                                       # re-run replaces in place
    assert [p.name for p in final.parent.iterdir()] == ["tokenizer"]


def test_trains_on_train_split_only_and_caps_chars(tiny_settings):
    stats = ingest.run(tiny_settings)
    texts = tokenizer.train_texts(tiny_settings)
    assert len(texts) == stats["splits"]["train"]
    tiny_settings.tokenizer.max_train_chars = 3000
    capped = tokenizer.train_texts(tiny_settings)
    assert sum(map(len, capped)) == 3000 and capped[0] == texts[0]
    assert tokenizer.run(tiny_settings)["train_chars"] == 3000


def test_missing_inputs_are_config_errors(tiny_settings):
    with pytest.raises(ConfigError, match="run `llmcycle data ingest` first"):
        tokenizer.run(tiny_settings)
    with pytest.raises(ConfigError, match="run `llmcycle data tokenizer` first"):
        tokenizer.load_tokenizer(tiny_settings)
