"""The GPU path, checked on CPU: every stage under bf16-mixed and 16-mixed with a fused AdamW and clipping,
precision auto, kernel selection, DataLoader workers, and no host sync per training step.

torch 2.13 has a fused AdamW and fp16 autocast + GradScaler on CPU, so Lightning's refusal to clip a fused
optimizer under mixed precision reproduces here, and so does the fix. Each stage's own LightningModule runs
a few steps under the project's build_trainer (logger off, to stay fast); whole stage runs are in the
stage tests.
"""
from __future__ import annotations

import pytest
import torch

from components import config as cfg
from components.data import layout
from components.errors import ConfigError
from components.training.trainer import build_trainer, configure_adamw, fit, loader_options, resolve_precision
from tests.unit.training.test_ppo import make_ppo_project

CLIP = 1e-8  # below every tiny stage's gradient norm (reward and DPO start near 1e-7): every step is clipped


# ----------------------------------------------------------------------------- pure selection logic
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU resolution; on a GPU auto picks bf16")
def test_precision_auto_resolves_to_32_true_on_cpu():
    assert resolve_precision("auto") == "32-true"
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("auto", "gpu") == "32-true"       # no CUDA device here
    for explicit in ("bf16-mixed", "16-mixed", "32-true"):
        assert resolve_precision(explicit, "cpu") == explicit
    assert cfg.TrainConfig().precision == cfg.PretrainConfig().precision == cfg.PpoConfig().precision == "auto"
    assert cfg.load("params.yaml").pretrain.precision == "auto"


def test_fused_adamw_is_auto_on_cuda_and_can_be_forced():
    model = torch.nn.Linear(4, 3)
    assert not configure_adamw(model, cfg.PretrainConfig()).defaults["fused"]           # auto: CPU -> unfused
    opt = configure_adamw(model, cfg.PretrainConfig(fused_adamw=True))
    assert opt.defaults["fused"] and opt._step_supports_amp_scaling                   # what Lightning refuses


def test_loader_options_workers_and_pinned_memory_only_on_cuda():
    assert loader_options("cpu") == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    assert loader_options("auto") == loader_options("cpu")                            # no CUDA here
    assert loader_options("cpu", num_workers=2)["num_workers"] == 2


def test_kernels_auto_is_none_on_cpu_and_explicit_liger_names_the_key():
    from components.model.kernels import liger_available, resolve_kernels

    assert resolve_kernels("auto", "cpu") == "none" and resolve_kernels("none", "cuda") == "none"
    with pytest.raises(ConfigError, match=r"pretrain\.kernels=liger needs a CUDA device"):
        resolve_kernels("liger", "cpu")
    if not liger_available():
        assert resolve_kernels("auto", "cuda") == "none"
        with pytest.raises(ConfigError, match=r"pretrain\.kernels=liger: liger-kernel is not installed"):
            resolve_kernels("liger", "cuda")
    with pytest.raises(Exception, match="kernels"):
        cfg.PretrainConfig(kernels="triton")


def test_train_windows_with_workers_are_the_same_stream(tmp_path):
    from components.training.data import TokenData
    from tests.unit.training.test_pretrain import project

    data = TokenData(project(tmp_path), block_size=32, batch_size=2, seed=3)
    plain = iter(data.train_loader(start_step=5))
    workers = iter(data.train_loader(start_step=5, num_workers=2))
    for _ in range(5):  # worker 0 builds steps 5, 7, 9; worker 1 steps 6, 8: interleaved in order
        assert torch.equal(next(plain), next(workers))


# ----------------------------------------------------------------------------- every stage, mixed precision
def _stage_module(stage: str, settings: cfg.Settings) -> tuple[object, cfg.TrainConfig, dict]:
    """(LightningModule, its config, fit kwargs) for one stage, wired as the stage's run() wires it."""
    from components.model.build import count_parameters, load_causal_lm
    from components.training import finetune_data as fd
    from components.training.stages import train_val_loaders

    start = str(layout.checkpoints_dir(settings, "pretrain") / "hf")
    c = getattr(settings, stage)
    if stage == "pretrain":
        from components.training.data import TokenData
        from components.training.pretrain import CausalLMModule, flops_per_token
        from tests.unit.training.helpers import write_tiny_data

        write_tiny_data(settings)
        model, _ = load_causal_lm(settings, start)
        data = TokenData(settings, block_size=model.config.max_position_embeddings, batch_size=c.batch_size, seed=0)
        fpt = flops_per_token(count_parameters(model), 2, 32, model.config.max_position_embeddings)
        return CausalLMModule(model.train(), c, data, fpt, peak_flops=1e9), c, {}
    if stage == "ppo":
        from components.training.ppo import PpoModule
        from components.training.reward import load_reward_model

        policy, tok = load_causal_lm(settings, start)
        ref, _ = load_causal_lm(settings, start, tokenizer=tok)
        reward_model, _ = load_reward_model(settings, str(layout.checkpoints_dir(settings, "reward") / "hf"))
        prompts = fd.PromptDataset(fd.sft_rows(settings, "train"), tok, max_prompt_len=48)
        train = fd.loader(prompts, c.rollout_batch, fd.PromptCollator(tok.pad_token_id), True, c.seed)
        module = PpoModule(policy.train(), ref, reward_model, tok, c)
        return module, c, {"train_dataloaders": train, "overrides": dict(max_steps=-1, max_epochs=-1,
                                                                           limit_val_batches=0)}
    if stage == "reward":
        from components.training.reward import RewardModule, load_reward_model

        model, tok = load_reward_model(settings, start)
        module = RewardModule(model.train(), c)
    else:
        model, tok = load_causal_lm(settings, start)
        if stage == "sft":
            from components.training.sft import SftModule
            module = SftModule(model.train(), c)
        else:
            from components.training.dpo import DpoModule
            module = DpoModule(model.train(), load_causal_lm(settings, start, tokenizer=tok)[0], c)
    dataset, collate, rows = (fd.SftDataset, fd.SftCollator(tok.pad_token_id), fd.sft_rows) if stage == "sft" else \
        (fd.PreferenceDataset, fd.PreferenceCollator(tok.pad_token_id), fd.preference_rows)
    train, val = train_val_loaders(c, dataset, collate, rows(settings, "train"), rows(settings, "val"), tok, 64)
    return module, c, {"train_dataloaders": train, "val_dataloaders": val}


class GradNorms:
    """Records the global gradient norm each optimizer step sees (runs after GradClip, before the step)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _GradNorms(Callback):
            def __init__(self) -> None:
                self.norms: list[float] = []
                self.scaler_stages: list[str] = []

            def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                if scaler is not None:  # torch's per-optimizer AMP state: UNSCALED = clipped true gradients
                    self.scaler_stages.append(scaler._per_optimizer_states[id(optimizer)]["stage"].name)
        return _GradNorms()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo", "ppo"])
def test_every_stage_trains_with_fused_adamw_clipping_and_mixed_precision(tiny_root, stage, precision):
    common = {"precision": precision, "fused_adamw": True, "grad_clip": CLIP, "val_every": 2, "val_batches": 1}
    steps = {"ppo": {"max_steps": 1, "ppo_epochs": 1, "rollout_batch": 2, "batch_size": 2}}.get(stage, {"max_steps": 2})
    settings = make_ppo_project(tiny_root, {"model": {"block_size": 64}, stage: {**common, **steps}})
    module, c, kwargs = _stage_module(stage, settings)
    norms = GradNorms()
    overrides = kwargs.pop("overrides", {})
    if precision == "16-mixed":
        # Lightning turns precision="16-mixed" on CPU into bf16-mixed; its fp16 plugin itself (autocast +
        # GradScaler) runs on CPU with torch 2.13, so it is passed directly: the real fp16 path.
        from lightning.pytorch.plugins import MixedPrecision
        overrides.update(precision=None, plugins=[MixedPrecision("16-mixed", "cpu")])
    trainer = build_trainer(settings, c, stage, None, callbacks=[norms], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, **overrides)
    assert trainer.precision == precision and trainer.gradient_clip_val is None
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit(trainer, module, **kwargs)   # Lightning's own clipping raises here for a fused AdamW

    opt = trainer.optimizers[0]
    assert opt.defaults["fused"]
    assert norms.norms and all(n <= CLIP * 1.01 for n in norms.norms), norms.norms  # unscaled, then clipped
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is None) == (precision == "bf16-mixed")
    # fp16: GradClip unscaled first (Lightning does not for a fused optimizer), so the clip saw true gradients.
    assert norms.scaler_stages == (["UNSCALED"] * len(norms.norms) if scaler is not None else [])
    # bf16 steps every time; fp16 may skip a step whose scaled gradients overflowed (and halve the scale).
    stepped = int(next(iter(opt.state.values()))["step"])  # the fused kernel does not count a skipped step
    assert stepped == len(norms.norms) or scaler is not None
    if stepped:
        after = module.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    else:
        assert scaler.get_scale() < 2.0 ** 16


def test_lightning_clipping_of_a_fused_adamw_is_what_crashed(tiny_root):
    """The reproduction: Lightning's gradient_clip_val with a fused AdamW under bf16-mixed."""
    settings = make_ppo_project(tiny_root, {"model": {"block_size": 64},
                                            "sft": {"precision": "bf16-mixed", "fused_adamw": True, "max_steps": 1}})
    module, c, kwargs = _stage_module("sft", settings)
    trainer = build_trainer(settings, c, "sft", None, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, gradient_clip_val=1.0)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(trainer, module, **kwargs)


# ----------------------------------------------------------------------------- no host sync per step
READS = ("item", "__float__", "__int__", "__index__", "__bool__", "tolist")  # every way a value reaches the host


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo"])
def test_no_stage_reads_a_tensor_on_the_host_between_logging_intervals(tiny_root, monkeypatch, stage):
    """On CUDA each of these reads waits for the GPU; the stages and Lightning may read once per interval.

    Every read during a training batch is recorded with the batch index and the file that asked. transformers'
    own mask checks (one per eager forward; skipped under torch.compile) are the library's, not the stage's.
    """
    import sys

    from lightning.pytorch.callbacks import Callback

    # max_steps 400 -> log_every 4; stopped after 12 batches. No validation or checkpoint on the way.
    settings = make_ppo_project(tiny_root, {"model": {"block_size": 64}, stage: {
        "max_steps": 400, "val_every": 1000, "ckpt_every": 1000, "precision": "bf16-mixed", "fused_adamw": True}})
    module, c, kwargs = _stage_module(stage, settings)
    state = {"batch": None}
    reads: list[tuple[int, str]] = []

    class Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            state["batch"] = batch_idx

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            trainer.should_stop = trainer.should_stop or trainer.global_step >= 12

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kw):
            caller = sys._getframe(1).f_code.co_filename
            # Not counted: transformers' mask checks, and the sampler's CPU-side index shuffle at an epoch start.
            if state["batch"] is not None and "/transformers/" not in caller and "/torch/utils/data/" not in caller:
                reads.append((state["batch"], caller))
            return original(self, *args, **kw)
        return read

    trainer = build_trainer(settings, c, stage, None, callbacks=[Batches()], logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
    assert trainer.log_every_n_steps == 4
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    fit(trainer, module, **kwargs)
    monkeypatch.undo()
    assert trainer.global_step == 12
    # Batch 0 (the pretrain clock's start) and the batches that end on a logging step (global_step 4, 8, 12).
    allowed = {0} | {k for k in range(12) if (k + 1) % 4 == 0}
    assert {batch for batch, _ in reads} <= allowed, sorted(reads)


@pytest.mark.slow
def test_nan_guard_reads_once_per_logging_interval_and_names_the_first_bad_step(tmp_path):
    """lr 1e30: the loss turns NaN at step 2; with log_every 4 the guard notices at step 4 and says both."""
    import re

    from components.errors import TrainingError
    from components.training import pretrain
    from components.training.trainer import last_checkpoint
    from tests.unit.training.test_pretrain import project, stage_runs

    s = project(tmp_path, ["pretrain.lr=1e30", "pretrain.max_steps=400", "pretrain.ckpt_every=50",
                           "pretrain.val_every=50"])
    with pytest.raises(TrainingError) as err:
        pretrain.run(s)
    msg = str(err.value)
    first = int(re.search(r"non-finite loss at step (\d+)", msg).group(1))
    assert 0 < first < 4 and "checked every 4 steps" in msg and "stopped at step 4" in msg, msg
    assert "last good checkpoint: none" in msg and last_checkpoint(s, "pretrain") is None  # none was due yet
    (run,) = stage_runs(s)
    assert run.info.status == "FAILED"


# ----------------------------------------------------------------------------- the loss path
def _tiny_llama():
    from components.model.build import build_model

    torch.manual_seed(0)
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 32, "intermediate_size": 32, "vocab_size": 64}
    return build_model(shape).train(), torch.randint(0, 64, (2, 17))              # model, (B, T + 1) window


def test_lm_loss_is_the_models_forward_and_causal_lm_loss():
    from components.training.hot_path import lm_loss
    from components.training.losses import causal_lm_loss

    model, w = _tiny_llama()
    x, y = w[:, :-1], w[:, 1:]
    assert torch.equal(lm_loss(model, x, y), causal_lm_loss(model(input_ids=x).logits, y))


@pytest.mark.slow
def test_compile_loss_traces_the_llama_loss_as_one_graph():
    """pretrain.compile: fullgraph=True holds for trunk + head + loss (no fallback warning), same value."""
    import warnings

    from components.training.hot_path import compile_loss, lm_loss

    model, w = _tiny_llama()
    x, y = w[:, :-1], w[:, 1:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = compile_loss(lambda a, b: lm_loss(model, a, b))(x, y)
    assert not [w for w in caught if "no full graph" in str(w.message)]
    assert torch.allclose(compiled, lm_loss(model, x, y), rtol=1e-4)
    compiled.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_compile_auto_is_on_for_cuda_only():
    from components.training.trainer import resolve_compile

    assert resolve_compile("auto", "cuda") is True and resolve_compile("auto", "cpu") is False
    assert resolve_compile(True, "cpu") is True and resolve_compile(False, "cuda") is False
