"""DSDCallback in the real Hugging Face Trainer: a tiny GPT-2 built from a config (no download),
CPU, fixed seeds. DSD through all three phases with exact zeros while sparse, the re-dense LR
1/10 of the Trainer's own schedule at every step, gradients masked before clipping, and a run
stopped in the sparse phase and resumed from a (moved) Trainer checkpoint bit-identical to an
uninterrupted one."""
import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments, get_scheduler)

from dsd_kernels.integrations.transformers import STATE_ATTRIBUTE, DSDCallback  # noqa: E402
from dsd_kernels.integrations._dsd_run import unwrap_optimizer  # noqa: E402
from dsd_kernels.optim import MaskedAdamW  # noqa: E402
from dsd_kernels.scope import select  # noqa: E402

SAMPLES, BATCH = 64, 8
STEPS_PER_EPOCH = SAMPLES // BATCH
PLAN = dict(dense_epochs=2, sparse_epochs=2, redense_epochs=1)  # 5 epochs, 40 steps
SPARSE_STEPS = range(2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH)  # 0-based optimizer steps


def dataset():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (SAMPLES, 16), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


class Probe(TrainerCallback):
    """Per optimizer step (after clipping, before the step): the LR the step runs at, and
    whether every pruned gradient entry is 0; after it, the zero count of every selected weight."""

    def __init__(self, dsd: DSDCallback):
        self.dsd, self.lrs, self.grads_masked, self.pruned = dsd, [], [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # a step pre-hook after the DSD scheduler's: the rate with the phase's scale applied
        unwrap_optimizer(optimizer).register_step_pre_hook(
            lambda opt, a, k: self.lrs.append(float(opt.param_groups[0]["lr"])))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        masks = self.dsd.scheduler.masks
        self.grads_masked.append(all(bool((p.grad[~m.to_bool()] == 0).all()) for p, m in masks.items()))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        masks = self.dsd.scheduler.masks
        self.pruned.append({name: (int((p == 0).sum()), bool((p[~masks[p].to_bool()] == 0).all())
                                   if p in masks else None)
                            for name, p in model.named_parameters() if p.dim() >= 2})


def train(out, *, optimizer=None, resume=None, save_steps=20, dsd=None, model=None, **extra):
    model = tiny_gpt2() if model is None else model
    options = dict(per_device_train_batch_size=BATCH, num_train_epochs=5, learning_rate=1e-3,
                   warmup_steps=3, lr_scheduler_type="linear", logging_steps=4,
                   save_strategy="steps", save_steps=save_steps, report_to=[], use_cpu=True, seed=0,
                   disable_tqdm=True, max_grad_norm=0.5)
    options.update(extra)
    dsd = dsd or DSDCallback(0.5, **PLAN)
    probe = Probe(dsd)
    optimizers = (optimizer(model), None) if optimizer else (None, None)
    trainer = Trainer(model=model, args=TrainingArguments(str(out), **options), train_dataset=dataset(),
                      callbacks=[dsd, probe], optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, probe


def expected_lrs(lr_scheduler_type: str, steps: int, warmup: int, lr: float, redense_from: int):
    """The Trainer's own schedule, built on its own, times 0.1 from the first re-dense step."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = get_scheduler(lr_scheduler_type, probe, num_warmup_steps=warmup, num_training_steps=steps)
    lrs = []
    for step in range(steps):
        lrs.append(schedule.get_last_lr()[0] * (0.1 if step >= redense_from else 1.0))
        probe.step()
        schedule.step()
    return lrs


@pytest.mark.parametrize("lr_scheduler_type", ["linear", "cosine"])
def test_three_phases_exact_zeros_and_lr_on_the_trainers_schedule(tmp_path, lr_scheduler_type):
    model, trainer, probe = train(tmp_path, lr_scheduler_type=lr_scheduler_type)
    selected = {s.name: s for s in select(model, 0.5)}
    assert set(selected) == {n for n, p in model.named_parameters()
                             if p.dim() >= 2 and "wte" not in n and "wpe" not in n}
    for step, pruned in enumerate(probe.pruned):
        for name, (zeros, at_pruned) in pruned.items():
            if name not in selected:
                continue
            if step in SPARSE_STEPS:  # exactly round(s*N) zeros, at the pruned positions
                assert zeros == round(0.5 * selected[name].param.numel()) and at_pruned, (step, name)
            else:
                assert zeros < 0.05 * selected[name].param.numel(), (step, name)
    assert probe.grads_masked[SPARSE_STEPS[0]:SPARSE_STEPS[-1] + 1] == [True] * len(SPARSE_STEPS)
    steps = 5 * STEPS_PER_EPOCH
    want = expected_lrs(lr_scheduler_type, steps, 3, 1e-3, redense_from=SPARSE_STEPS[-1] + 1)
    assert len(probe.lrs) == steps
    for step, (got, expected) in enumerate(zip(probe.lrs, want)):
        assert math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-18), (step, got, expected)
    entered = [(h["dsd/entered"], h["step"]) for h in trainer.state.log_history if "dsd/entered" in h]
    assert entered == [("sparse", 16), ("redense", 32)]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["dsd/phase"] for h in logged] == [0.0] * 4 + [1.0] * 4 + [2.0] * 2
    assert logged[5]["dsd/sparsity"] == 0.5


def test_unit_step_follows_global_step(tmp_path):
    dsd = DSDCallback(0.5, dense_epochs=10, sparse_epochs=12, redense_epochs=18, unit="step")
    model, trainer, probe = train(tmp_path, dsd=dsd)
    entered = [(h["dsd/entered"], h["step"]) for h in trainer.state.log_history if "dsd/entered" in h]
    assert entered == [("sparse", 10), ("redense", 22)]
    name = "transformer.h.0.mlp.c_fc.weight"
    numel = dict(model.named_parameters())[name].numel()
    # probe.pruned[i]: after optimizer step i + 1 and this callback's on_step_end (which pruned
    # after step 10 and re-densed after step 22, the pruned weights still 0 until step 23)
    assert [probe.pruned[i][name][0] == numel // 2 for i in (8, 9, 21, 22)] == [False, True, True, False]


@pytest.mark.parametrize("optimizer", [None, lambda m: MaskedAdamW(m.parameters(), lr=1e-3)],
                         ids=["trainer AdamW", "MaskedAdamW"])
def test_resume_from_a_moved_checkpoint_in_the_sparse_phase_is_bit_identical(tmp_path, optimizer):
    whole, _, whole_probe = train(tmp_path / "whole", optimizer=optimizer)
    checkpoint = tmp_path / "elsewhere"  # the folder moved: the state rides in its scheduler.pt
    shutil.copytree(tmp_path / "whole" / "checkpoint-20", checkpoint)
    resumed, trainer, probe = train(tmp_path / "resumed", optimizer=optimizer, resume=str(checkpoint))
    assert trainer.state.global_step == 40
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert probe.lrs == whole_probe.lrs[20:]
    assert probe.pruned[:12] == whole_probe.pruned[20:32]  # the same masks after the resume


def test_checkpoint_carries_the_dsd_state(tmp_path):
    train(tmp_path, save_steps=20)
    saved = torch.load(tmp_path / "checkpoint-20" / "scheduler.pt", weights_only=True)[STATE_ATTRIBUTE]
    assert saved["epoch"] == 2 and saved["lr_scaled"] is False and len(saved["masks"]) == 8


def test_resume_with_another_plan_is_refused(tmp_path):
    train(tmp_path / "a")
    with pytest.raises(ValueError, match="sparse_epochs"):
        train(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-20"),
              dsd=DSDCallback(0.5, dense_epochs=2, sparse_epochs=1, redense_epochs=2))


def test_resume_from_a_run_without_dsd_is_refused(tmp_path):
    model = tiny_gpt2()
    args = TrainingArguments(str(tmp_path / "plain"), per_device_train_batch_size=BATCH, max_steps=4,
                             save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=dataset()).train()
    with pytest.raises(RuntimeError, match="without DSDCallback"):
        train(tmp_path / "b", resume=str(tmp_path / "plain" / "checkpoint-4"))


def test_bf16_autocast(tmp_path):
    model, _, probe = train(tmp_path, bf16=True, save_strategy="no")
    name = "transformer.h.1.attn.c_attn.weight"
    numel = dict(model.named_parameters())[name].numel()
    assert all(probe.pruned[s][name] == (numel // 2, True) for s in SPARSE_STEPS)


@pytest.mark.slow
def test_torch_compile(tmp_path):
    model, _, probe = train(tmp_path, torch_compile=True, save_strategy="no")
    name = "transformer.h.1.mlp.c_proj.weight"
    numel = dict(model.named_parameters())[name].numel()
    assert all(probe.pruned[s][name] == (numel // 2, True) for s in SPARSE_STEPS)


def test_bad_arguments_fail_when_the_callback_is_built():
    with pytest.raises(ValueError, match="sparsity"):
        DSDCallback(1.5, 1, 1, 1)
    with pytest.raises(ValueError, match="unit"):
        DSDCallback(0.5, 1, 1, 1, unit="batch")
    with pytest.raises(ValueError, match="sparse_epochs"):
        DSDCallback(0.5, 1, 0, 1)
    with pytest.raises(ValueError, match="redense_lr_scale"):
        DSDCallback(0.5, 1, 1, 1, redense_lr_scale=0)


def test_gradual_prune_and_lr_ladder_on_the_trainers_schedule(tmp_path):
    """ramp_epochs=3 over a 1+3+1 plan: each sparse epoch prunes further (the gradient hooks
    follow every update, so clipping always sees masked gradients), and every step runs at the
    Trainer's linear schedule x0.5 sparse, x0.05 re-dense."""
    dsd = DSDCallback(0.5, dense_epochs=1, sparse_epochs=3, redense_epochs=1, sparse_lr_scale=0.5, ramp_epochs=3)
    model, trainer, probe = train(tmp_path, dsd=dsd)
    selected = {s.name: s.param.numel() for s in select(model, 0.5)}
    for k in (1, 2, 3):
        share = 1 - (1 - k / 3) ** 3
        inside = probe.pruned[(k + 1) * STEPS_PER_EPOCH - 2]
        for name, numel in selected.items():
            zeros, at_pruned = inside[name]
            assert zeros == round(0.5 * share * numel) and at_pruned, (k, name)
    assert probe.grads_masked[STEPS_PER_EPOCH:4 * STEPS_PER_EPOCH] == [True] * 3 * STEPS_PER_EPOCH
    steps = 5 * STEPS_PER_EPOCH
    rates = expected_lrs("linear", steps, 3, 1e-3, redense_from=steps)
    scales = [1.0] * STEPS_PER_EPOCH + [0.5] * 3 * STEPS_PER_EPOCH + [0.05] * STEPS_PER_EPOCH
    for step, (got, rate, scale) in enumerate(zip(probe.lrs, rates, scales)):
        assert math.isclose(got, rate * scale, rel_tol=1e-12, abs_tol=1e-18), (step, got, rate * scale)
    logged = [h for h in trainer.state.log_history if "loss" in h]  # every 4 steps, before a phase change
    assert [h["dsd/lr_scale"] for h in logged] == pytest.approx([1.0] * 2 + [0.5] * 6 + [0.05] * 2)



# ---------------------------------------------------------------- RigL / SET
def rigl_callback(growth="gradient"):
    from dsd_kernels.integrations.transformers import RigLCallback
    return RigLCallback(0.5, update_every=4, end_step=30, growth=growth, drop_fraction=0.5)


@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_rigl_callback_exact_counts_masked_clipping_and_moved_checkpoint_resume(tmp_path, growth):
    whole, trainer, probe = train(tmp_path / "whole", dsd=rigl_callback(growth))
    scheduler = probe.dsd.scheduler
    assert scheduler.updates == 7  # after steps 4, 8, ..., 28
    assert probe.grads_masked and all(probe.grads_masked)  # the Trainer clipped masked gradients
    for p, m in scheduler.masks.items():
        assert m.numel - m.count() == round(0.5 * m.numel) and (p[~m.to_bool()] == 0).all()
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "whole" / "checkpoint-20"), str(moved))
    resumed, _, resumed_probe = train(tmp_path / "resumed", dsd=rigl_callback(growth), resume=str(moved))
    assert resumed_probe.dsd.scheduler.updates == 7
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_rigl_callback_keeps_the_dense_gradient_through_accumulation(tmp_path):
    """With two micro-batches per step, the gradient RigL grows by is the whole step's dense
    gradient: the same masks as one batch of twice the size (the same samples, the mean loss)."""
    def run(out, **options):
        cb = rigl_callback()
        torch.manual_seed(0)  # no dropout: the micro-batches then compute what the whole batch does
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        model, _, _ = train(out, dsd=cb, save_steps=1000, num_train_epochs=1, model=model, **options)
        return {n: cb.scheduler.masks[p].to_bool() for n, p in model.named_parameters() if p in cb.scheduler.masks}
    one = run(tmp_path / "one", per_device_train_batch_size=2 * BATCH)
    two = run(tmp_path / "two", per_device_train_batch_size=BATCH, gradient_accumulation_steps=2)
    assert one.keys() == two.keys() and all(torch.equal(one[n], two[n]) for n in one)
