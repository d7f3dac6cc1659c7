"""serving.quantize: none / int8 / auto through the real ModelStore load path (a save_pretrained folder):
auto keeps fp32 below the measured width and says why, quantizes at and above it, and the int8 model
the server serves decodes the same greedy text as generate() on that model at batch 1."""
from __future__ import annotations

import pytest
import torch

from components import config as cfg
from components.evaluation.quantize import INT8_MIN_HIDDEN, int8_pays
from components.model.build import build_model
from components.model.generation import generate
from components.serving.engine import SamplingParams
from components.serving.model_store import ModelStore
from tests.unit.training.helpers import tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*quantize.*:UserWarning")


def _folder(tmp_path, tok, width: int):
    torch.manual_seed(0)
    shape = {"n_layer": 1, "n_head": 4, "n_embd": width, "block_size": 64, "intermediate_size": 2 * width,
             "vocab_size": len(tok)}
    model = build_model(shape, tok)
    with torch.no_grad():   # varied, well-separated greedy paths (see varied_tiny_model)
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(8)
    folder = tmp_path / f"w{width}"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _load(tiny_settings, folder, mode: str):
    settings = cfg.load(tiny_settings.root / "params.yaml", [f"serving.quantize={mode}"])
    store = ModelStore(settings, str(folder))
    return store.load(store.resolve(str(folder)))


def _quantized(model) -> bool:
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def test_rule_names_the_width_and_the_threshold():
    tok = tiny_tokenizer()
    narrow = build_model({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "intermediate_size": 64,
                          "vocab_size": len(tok)}, tok)
    pays, why = int8_pays(narrow)
    assert not pays and "hidden size 32" in why and str(INT8_MIN_HIDDEN) in why


def test_auto_keeps_fp32_below_the_measured_width_and_int8_forces_it(tiny_settings, tmp_path):
    tok = tiny_tokenizer()
    folder = _folder(tmp_path, tok, 64)
    served = _load(tiny_settings, folder, "auto")
    try:
        assert served.precision == "fp32" and not _quantized(served.model)
        assert "hidden size 64" in served.precision_reason
    finally:
        served.engine.stop()
    served = _load(tiny_settings, folder, "int8")   # explicit int8 is obeyed even where it does not pay
    try:
        assert served.precision == "int8" and _quantized(served.model)
    finally:
        served.engine.stop()


def test_auto_serves_int8_where_it_pays_and_matches_int8_generate_at_batch_1(tiny_settings, tmp_path):
    tok = tiny_tokenizer()
    served = _load(tiny_settings, _folder(tmp_path, tok, INT8_MIN_HIDDEN), "auto")
    try:
        assert served.precision == "int8" and _quantized(served.model)
        assert f"hidden size {INT8_MIN_HIDDEN}" in served.precision_reason
        for prompt in ("def compute_items(data):\n", "import os\n\nCONST"):
            ids = tok.encode(prompt, add_special_tokens=False)
            got = served.engine.submit(ids, SamplingParams(max_tokens=16)).result(timeout=60).text
            assert got == generate(served.model, tok, [prompt], max_new_tokens=16)[0]
    finally:
        served.engine.stop()


def test_torch_threads_setting_reaches_the_engine_loop(tiny_settings, tmp_path):
    tok = tiny_tokenizer()
    folder = _folder(tmp_path, tok, 64)
    settings = cfg.load(tiny_settings.root / "params.yaml", ["serving.torch_threads=1"])
    store = ModelStore(settings, str(folder))
    served = store.load(store.resolve(str(folder)))
    try:
        assert served.engine.threads == 1
        ids = tok.encode("x = 1", add_special_tokens=False)
        got = served.engine.submit(ids, SamplingParams(max_tokens=8)).result(timeout=60).text
        assert got == generate(served.model, tok, ["x = 1"], max_new_tokens=8)[0]
    finally:
        served.engine.stop()
