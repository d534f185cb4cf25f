"""DSDScheduler and the pruning scope on bad arguments and surprising models: a clear error
before anything runs, one default scope whichever path, and tied weights by the documented rule."""
import math
import warnings

import pytest
import torch
from torch import nn

import dsd_kernels as dk
from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.optim import MaskedAdamW, MaskedSGD

SCHEDULE = dict(dense_epochs=1, sparse_epochs=1, redense_epochs=1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("kwargs,named", [
    (dict(sparsity={"nomatch": 0.5}), "'nomatch'"),
    (dict(sparsity=0.5, include=["nomatch"]), "include rule 'nomatch'"),
    (dict(sparsity=0.5, exclude=["nomatch"]), "exclude rule 'nomatch'"),
    (dict(sparsity=0.5, include=[nn.Conv2d]), "include rule Conv2d"),
    (dict(sparsity={"0": 0.5, "bias_only": 0.3}), "'bias_only'"),
])
def test_a_rule_that_matches_no_weight_is_refused(kwargs, named):
    model = mlp()
    with pytest.raises(ValueError, match=f"{named}.* match(es)? no weight"):
        DSDScheduler(torch.optim.SGD(model.parameters(), lr=0.1), model=model, **SCHEDULE, **kwargs)


@pytest.mark.parametrize("scale", [math.inf, math.nan, -0.1, 0.0])
def test_redense_lr_scale_must_be_positive_and_finite(scale):
    model = mlp()
    with pytest.raises(ValueError, match="redense_lr_scale must be a positive finite number"):
        DSDScheduler(MaskedSGD(model.parameters(), lr=0.1), model=model, sparsity=0.5, redense_lr_scale=scale,
                     **SCHEDULE)


@pytest.mark.parametrize("change,named", [
    (lambda s: {}, "lacks epoch"), (lambda s: {**s, "epoch": -5}, "epoch=-5"),
    (lambda s: {**s, "epoch": 999}, "epoch=999"), (lambda s: {**s, "redense_lr_scale": math.inf}, "redense_lr_scale"),
    (lambda s: {**s, "lr_scaled": "yes"}, "lr_scaled"), (lambda s: {**s, "dense_epochs": 7}, "dense_epochs=7"),
])
def test_load_state_dict_checks_everything_before_changing_anything(change, named):
    model = mlp()
    dsd = DSDScheduler(torch.optim.SGD(model.parameters(), lr=0.1), model=model, sparsity=0.5, **SCHEDULE)
    dsd.step()  # sparse now: masks held
    before = dsd.state_dict()
    with pytest.raises(ValueError, match=named):
        dsd.load_state_dict(change(dsd.state_dict()))
    after = dsd.state_dict()
    assert after["epoch"] == before["epoch"] and after["lr_scaled"] == before["lr_scaled"]
    assert set(dsd.masks) == {model[0].weight, model[2].weight}


def test_without_model_every_matrix_is_pruned_with_a_warning_that_says_how_to_pass_the_model():
    model = tiny_gpt2()
    opt = MaskedAdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"without model=.*embeddings and norms included.*pass model="):
        DSDScheduler(opt, sparsity=0.5, **SCHEDULE)
    # with model=, the default scope: the blocks (HF Conv1D), not the embeddings
    opt = MaskedAdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dsd = DSDScheduler(opt, model=model, sparsity=0.5, **SCHEDULE)
    dsd.step()
    pruned = {n for n, p in model.named_parameters() if p in dsd.masks}
    assert "transformer.wte.weight" not in pruned and "transformer.wpe.weight" not in pruned
    assert "transformer.h.0.attn.c_attn.weight" in pruned


def test_tied_weight_is_pruned_only_when_include_matches_every_holder():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"include selects lm_head\.weight through one of its holders only.*"
                                         r"transformer\.wte\.weight \(Embedding\)"):
        # nn.Linear reaches only the tied embedding (GPT-2's blocks are Conv1D): nothing is left to prune
        with pytest.raises(ValueError, match="selects no weight"):
            DSDScheduler(opt, model=model, include=[nn.Linear], sparsity=0.5, **SCHEDULE)
    dsd = DSDScheduler(opt, model=model, include=[nn.Linear, nn.Embedding], sparsity=0.5, **SCHEDULE)
    dsd.step()
    assert model.transformer.wte.weight in dsd.masks  # every holder named: pruned, one mask


def test_scope_arguments_without_model_say_that_they_need_it():
    model = mlp()
    with pytest.raises(TypeError, match=r"^exclude need model="):
        DSDScheduler(MaskedAdamW(model.parameters()), exclude=["0"], sparsity=0.5, **SCHEDULE)
    with pytest.raises(TypeError, match="cannot hold masks: pass model="):
        DSDScheduler(torch.optim.Adam(model.parameters()), sparsity=0.5, **SCHEDULE)


@pytest.mark.parametrize("optimizer", ["MaskedAdamW", "MaskedSGD", "Adam"])
def test_summary_reads_the_scheduler_and_every_mask_holder(optimizer):
    model = mlp()
    opt = {"MaskedAdamW": lambda: MaskedAdamW(model.parameters()), "MaskedSGD": lambda: MaskedSGD(
        model.parameters(), lr=0.1), "Adam": lambda: torch.optim.Adam(model.parameters())}[optimizer]()
    dsd = DSDScheduler(opt, model=model, sparsity=0.5, **SCHEDULE)
    dsd.step()
    holders = [dsd, dsd.masks] + ([dsd.optimizer_masks] if dsd.optimizer_masks is not None else [opt])
    for holder in holders:
        rows = [line.split() for line in dk.summary(model, holder).splitlines()[1:]]
        assert [row[-1] for row in rows] == ["optimizer", "optimizer"], type(holder).__name__
    with pytest.raises(TypeError, match="summary: masks must be a DSDScheduler"):
        dk.summary(model, torch.optim.SGD(model.parameters(), lr=0.1))
