"""The gate's scorecard of one model on the current evaluation data, cached per (model, data, params).

score(): bits per byte of the held-out SFT responses given their prompts and of the raw test split,
per document, each model tokenizing the text itself; with baselines=True the same for the Kneser-Ney
trigram and add-one unigram (fit on the train split with the data tokenizer); and the share of greedy
completions of evaluate.n_prompts held-out prompts that are parsable function definitions.

for_version(): the scorecard of a registered version on today's data: from the local cache, else from
the evaluate run that scored it (when that run saw the same data hash and evaluate params), else
scored now. This is how the champion is judged on the candidate's data, never on old tags.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np

from components import tracking
from components.config import Settings
from components.data import io
from components.evaluation.bpb import DocScores, doc_scores, model_bits, ngram_bits, sft_items, test_documents, test_items
from components.evaluation.gate import Scorecard

ARTIFACT = "evaluation/scorecard.json"
BASE_DOMAIN = "base"      # SFT rows without a `domain` field
GEN_BATCH = 8


def eval_params_hash(settings: Settings) -> str:
    """The evaluate params that change scores (not the gate's confidence or tolerances)."""
    e = settings.evaluate
    blob = json.dumps({"n_prompts": e.n_prompts, "max_new_tokens": e.max_new_tokens,
                       "test_max_bytes": e.test_max_bytes, "v": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def card_to_json(card: Scorecard) -> dict[str, Any]:
    return {"metrics": card.metrics, "docs": {k: v.to_json() for k, v in card.docs.items()}}


def card_from_json(obj: dict[str, Any]) -> Scorecard:
    return Scorecard({k: float(v) for k, v in obj["metrics"].items()},
                     {k: DocScores.from_json(v) for k, v in obj["docs"].items()})


# ----------------------------------------------------------------------------- scoring
def sft_test_rows(settings: Settings) -> list[dict]:
    from components.training.finetune_data import sft_rows

    return sft_rows(settings, "test")


def prompt_rows(settings: Settings, test_rows: list[dict]) -> list[dict]:
    """The first evaluate.n_prompts held-out SFT rows whose completions are checked: the test split, then val
    (never trained on either) when the test split is shorter, so the rates rest on enough prompts."""
    from components.training.finetune_data import sft_rows

    n = settings.evaluate.n_prompts
    rows = list(test_rows[:n])
    if len(rows) < n:
        rows += sft_rows(settings, "val")[:n - len(rows)]
    return rows


def completions_of(model: Any, tokenizer: Any, prompts: list[str], max_new: int) -> list[str]:
    """Greedy completions of chat-formatted prompts, batched."""
    from components.model.generation import generate

    out: list[str] = []
    for i in range(0, len(prompts), GEN_BATCH):
        out += generate(model, tokenizer, prompts[i:i + GEN_BATCH], max_new_tokens=max_new, temperature=0.0)
    return out


def fit_count_models(settings: Settings) -> dict[str, Any]:
    """The KN trigram and add-one unigram fit on the train split's token arrays (one fit per evaluation)."""
    from components.evaluation.evaluate import load_tokens
    from components.evaluation.ngram import AddOneUnigram, KneserNeyTrigram

    train, meta = load_tokens(settings, "train")
    vocab = int(meta["vocab_size"])
    return {"kn3": KneserNeyTrigram(vocab).fit(train), "unigram": AddOneUnigram(train, vocab)}


def score(settings: Settings, model: Any, tokenizer: Any, device: Any,
          baselines: bool | dict[str, Any] = False) -> tuple[Scorecard, dict]:
    """(scorecard, extras) of a loaded model on the current data; extras: rows, prompts, completions, checks.

    baselines: True fits the count models here, a dict from fit_count_models reuses them, False skips them.
    """
    from components.data.tokenizer import format_prompt
    from components.evaluation.scorers import score_completions

    block = int(model.config.max_position_embeddings)
    rows = sft_test_rows(settings)
    docs = test_documents(settings, settings.evaluate.test_max_bytes)
    items = {"sft": sft_items(tokenizer, rows), "test": test_items(tokenizer, docs)}
    card = Scorecard({}, {})
    for split, its in items.items():
        card.docs[split] = doc_scores(its, model_bits(model, its, block, device))
        card.metrics[f"{split}_bits_per_byte"] = card.docs[split].bits_per_byte
    add_domains(card, rows)
    if baselines:
        _baselines(settings, rows, docs, card, baselines if isinstance(baselines, dict) else fit_count_models(settings))

    prompt_rows_ = prompt_rows(settings, rows)
    prompts = [format_prompt(tokenizer, r["prompt"]) for r in prompt_rows_]
    t0 = time.perf_counter()
    completions = completions_of(model, tokenizer, prompts, settings.evaluate.max_new_tokens)
    gen_wall = time.perf_counter() - t0
    checks = score_completions([r.get("name", "") for r in prompt_rows_], completions)
    ids = [str(r.get("id", i)) for i, r in enumerate(prompt_rows_)]
    for outcome in ("syntax_valid", "defines_name"):
        # Per prompt, so the gate compares two models' rates pairwise on the same prompts.
        card.docs[outcome] = DocScores.outcomes(ids, [bool(c[outcome]) for c in checks])
        card.metrics[f"{outcome}_rate"] = card.docs[outcome].bits_per_byte if checks else 0.0
    return card, {"rows": prompt_rows_, "prompts": prompts, "completions": completions, "checks": checks,
                  "generation_wall_s": gen_wall}


def add_domains(card: Scorecard, rows: list[dict]) -> None:
    """With more than one `domain` among the SFT test rows (a retrain's `drifted` slice beside the base rows),
    each domain's documents as docs["sft@<domain>"] and metric sft_<domain>_bits_per_byte."""
    domains = [str(r.get("domain") or BASE_DOMAIN) for r in rows]
    if len(set(domains)) < 2:
        return
    for domain in sorted(set(domains)):
        part = card.docs["sft"].subset([i for i, d in enumerate(domains) if d == domain])
        card.docs[f"sft@{domain}"] = part
        card.metrics[f"sft_{domain}_bits_per_byte"] = part.bits_per_byte


def _baselines(settings: Settings, rows: list[dict], docs: list[dict], card: Scorecard, models: dict[str, Any]) -> None:
    """KN trigram and unigram bits per byte on the same texts, tokenized by the data tokenizer.

    The count models were fit on raw text, where <|end|> never occurs: a response's end marker is
    scored as EOT (the end of a text they have seen), or the baselines would pay ~20 bits per response
    for a token they could not know, and the bar a model must clear would be lower than it looks.
    """
    from components.data.tokenizer import load_tokenizer

    data_tok = load_tokenizer(settings)
    items = {"sft": sft_items(data_tok, rows, end_as_eot=True), "test": test_items(data_tok, docs)}
    for name, lm in models.items():
        for split, its in items.items():
            card.docs[f"{split}.{name}"] = doc_scores(its, ngram_bits(lm.token_logprobs, its))
            card.metrics[f"baseline_{name}_{split}_bits_per_byte"] = card.docs[f"{split}.{name}"].bits_per_byte


# ----------------------------------------------------------------------------- per registered version
def trained_run(mv: Any) -> str:
    """The run that trained a version's weights (its trained_run_id tag, else the run it was registered from)."""
    return (mv.tags or {}).get("trained_run_id") or getattr(mv, "run_id", None) or "unknown"


def cache_path(settings: Settings, mv: Any) -> Any:
    """data/evaluation/scorecards/<key>.json; the key names the store, the version and the run behind its
    weights (version numbers restart in a new store), the data hash and the evaluate params."""
    store = hashlib.sha256(tracking.tracking_uri(settings).encode()).hexdigest()[:8]
    key = (f"{mv.name}-v{mv.version}-{trained_run(mv)[:12]}-{store}-{tracking.data_hash(settings.root)}-"
           f"{eval_params_hash(settings)}")
    return settings.path("data", "evaluation", "scorecards", f"{key}.json")


def from_eval_run(settings: Settings, run_id: str, weights_run: str, baselines: bool) -> Scorecard | None:
    """The scorecard an evaluate run logged, if it scored these very weights on today's data and params."""
    import mlflow

    tracking.configure(settings)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # noqa: BLE001 - a run from another store (or gone): score anew instead
        return None
    tags = run.data.tags
    if tags.get("weights_run_id") != weights_run or tags.get("data_hash") != tracking.data_hash(settings.root) \
            or tags.get("eval_params_hash") != eval_params_hash(settings):
        return None
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT)
    except Exception:  # noqa: BLE001 - an evaluate run without a scorecard: score anew
        return None
    card = card_from_json(json.loads(open(path, encoding="utf-8").read()))
    return card if not baselines or "sft.kn3" in card.docs else None


def for_version(settings: Settings, mv: Any, baselines: bool = False) -> tuple[Scorecard, str]:
    """(scorecard, where it came from: cache | evaluate run <id> | scored now) of a registered version.

    baselines=True (the candidate, whose criteria compare it with the count models) makes sure the
    card holds the baselines' per-document scores too.
    """
    path = cache_path(settings, mv)
    if path.is_file():
        card = card_from_json(json.loads(path.read_text()))
        if not baselines or "sft.kn3" in card.docs:
            return card, "cache"
    card, source = None, "scored now"
    eval_run_id = (mv.tags or {}).get("eval_run_id")
    if eval_run_id:
        card = from_eval_run(settings, eval_run_id, trained_run(mv), baselines)
        source = f"evaluate run {eval_run_id}"
    if card is None:
        import torch

        from components.model.build import load_causal_lm

        source = "scored now"
        model, tokenizer = load_causal_lm(settings, f"models:/{mv.name}/{mv.version}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
        card, _ = score(settings, model, tokenizer, device, baselines=baselines)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(path, card_to_json(card))
    return card, source
