"""Masks, learning rates and scheduler hooks are never lost or changed without a word (issue
38, items 1-6, 10, 11, 13): state dicts through DCP in any restore order, torch optimizers in
between, refused loads, steps that raise, schedulers dropped, doubled or copied."""
import copy
import gc
import pickle
import warnings

import pytest
import torch
from torch import nn

from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.optim import MaskedAdamW, MaskedSGD, OptimizerMasks

KINDS = ["masked_sgd", "masked_adamw", "adamw"]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def optimizer(kind, model, lr=0.05):
    if kind == "masked_sgd":
        return MaskedSGD(model.parameters(), lr=lr, momentum=0.9)
    if kind == "masked_adamw":
        return MaskedAdamW(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr)


def scheduler(opt, model, **kw):
    return DSDScheduler(opt, model=model, **{"dense_epochs": 1, "sparse_epochs": 2, "redense_epochs": 1,
                                             "sparsity": 0.5, **kw})


def train_step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def zeros(model) -> list[int]:
    return [int((model[i].weight == 0).sum()) for i in (0, 2)]


# ------------------------------------------------------------------ 1: DCP in any order
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ["optimizer_first", "scheduler_first"])
def test_dcp_recipe_restores_the_masks_saved_in_either_order(kind, order, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = mlp()
    opt = optimizer(kind, model)
    dsd = scheduler(opt, model)
    train_step(model, opt)
    dsd.step()  # sparse
    train_step(model, opt, 1)
    saved_masks = {i: dsd.masks[model[i].weight].clone() for i in (0, 2)}
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "dsd": dsd.state_dict()}, checkpoint_id=str(tmp_path))
    train_step(model, opt, 2)
    expected = [p.detach().clone() for p in model.parameters()]

    model2 = mlp(1)
    opt2 = optimizer(kind, model2)
    dsd2 = scheduler(opt2, model2)  # built dense: its template names no mask
    model_sd, optim_sd = get_state_dict(model2, opt2)
    state = {"model": model_sd, "optim": optim_sd, "dsd": dsd2.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path))
    if order == "scheduler_first":
        dsd2.load_state_dict(state["dsd"])
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if order == "optimizer_first":
        dsd2.load_state_dict(state["dsd"])
    assert {i: dsd2.masks[model2[i].weight] for i in (0, 2)} == saved_masks
    train_step(model2, opt2, 2)
    assert zeros(model2) == [64, 32]
    for a, b in zip(model2.parameters(), expected):
        assert torch.equal(a, b)


def test_a_template_built_while_sparse_takes_a_dense_checkpoint_dense(tmp_path):
    import torch.distributed.checkpoint as dcp
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    dsd = scheduler(opt, model)
    dcp.save({"dsd": dsd.state_dict()}, checkpoint_id=str(tmp_path))  # dense
    dsd.step()
    assert len(dsd.masks) == 2
    state = {"dsd": dsd.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path))
    dsd.load_state_dict(state["dsd"])
    assert dsd.masks == {} and dsd.phase == "dense"


# ------------------------------------------------------------------ 2: a step that raises
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_step_that_raises_leaves_the_rate_unscaled(kind, tensor_lr):
    model = mlp()
    opt = optimizer(kind, model, lr=torch.tensor(1.0) if tensor_lr else 1.0)
    dsd = scheduler(opt, model, sparse_lr_scale=0.1)
    dsd.step()

    def closure():
        raise RuntimeError("loss failed")
    with pytest.raises(RuntimeError, match="loss failed"):
        opt.step(closure)
    assert float(opt.param_groups[0]["lr"]) == 1.0
    assert float(opt.state_dict()["param_groups"][0]["lr"]) == 1.0


def test_an_lr_scheduler_built_after_the_dsd_scheduler_still_counts_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dsd = scheduler(opt, model, sparse_lr_scale=0.1)
    lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    dsd.step()
    train_step(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns where step() lost its step counter
        lr_sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


# ------------------------------------------------------------------ 3, 4: one scheduler per optimizer
def test_a_dropped_scheduler_leaves_no_hooks():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    d1 = scheduler(opt, model, sparse_epochs=1)
    d1.step()
    state = d1.state_dict()
    del d1
    gc.collect()
    d2 = scheduler(opt, model, sparse_epochs=1)
    d2.load_state_dict(state)
    assert d2.step() == "redense"
    with torch.no_grad():  # nonzero everywhere: only a mask still applied makes zeros
        for p in model.parameters():
            p.fill_(0.1)
    train_step(model, opt)
    assert zeros(model) == [0, 0]


def test_a_second_scheduler_on_one_optimizer_is_refused_until_the_first_is_closed():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    d1 = scheduler(opt, model, sparse_lr_scale=0.1)
    with pytest.raises(ValueError, match="already has a DSDScheduler.*epoch 0.*close"):
        scheduler(opt, model, sparse_lr_scale=0.1)
    d1.close()
    d2 = scheduler(opt, model, sparse_lr_scale=0.1)
    d2.step()
    assert d2.pruned_fraction() == 0.5
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    train_step(model, opt)
    assert seen == [pytest.approx(0.1)]


# ------------------------------------------------------------------ 5: masks of 1-D parameters
@pytest.mark.parametrize("kind", KINDS)
def test_a_mask_on_a_one_dim_parameter_is_refused(kind):
    model = mlp()
    opt = optimizer(kind, model)
    holder = opt if kind != "adamw" else OptimizerMasks(opt)
    with pytest.raises(ValueError, match="parameter 1 .*2 or more dims"):
        holder.set_masks({model[0].bias: torch.ones(16, dtype=torch.bool)})
    assert holder.masks == {}


@pytest.mark.parametrize("kind", KINDS)
def test_a_loaded_mask_entry_for_a_one_dim_parameter_is_refused(kind):
    model = mlp()
    opt = optimizer(kind, model)
    if kind == "adamw":
        OptimizerMasks(opt)
    train_step(model, opt)
    sd = opt.state_dict()
    sd["state"][1]["mask"] = torch.full((1, 4), 255, dtype=torch.uint8)
    with pytest.raises(ValueError, match="parameter 1 .*2 or more dims"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------ 6: a refused load changes nothing
def test_a_load_torch_refuses_leaves_optimizer_masks_unchanged():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    masks = OptimizerMasks(opt)
    masks.set_masks({model[0].weight: model[0].weight.abs() > 0.2})
    before = masks.masks
    other = mlp()
    other_opt = torch.optim.AdamW([{"params": [other[0].weight]}, {"params": list(other.parameters())[1:]}])
    other_masks = OptimizerMasks(other_opt)
    other_masks.set_masks({other[2].weight: other[2].weight.abs() > 0.1})
    sd = other_opt.state_dict()
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert masks.masks == before
    train_step(model, opt)
    assert int((model[2].weight == 0).sum()) == 0


def test_a_load_that_succeeds_zeroes_the_newly_pruned_weights_and_state():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    masks = OptimizerMasks(opt)
    train_step(model, opt)
    sd = copy.deepcopy(opt.state_dict())
    keep = model[0].weight.abs() > 0.2
    masks.set_masks({model[0].weight: keep})
    sd_masked = opt.state_dict()
    masks.clear_masks()
    opt.load_state_dict(sd)
    assert masks.masks == {}
    opt.load_state_dict(sd_masked)
    assert set(masks.masks) == {model[0].weight}
    assert bool((model[0].weight[~keep] == 0).all())


# ------------------------------------------------------------------ 10: through a torch optimizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ours,theirs", [(MaskedAdamW, torch.optim.AdamW), (MaskedSGD, torch.optim.SGD)])
def test_a_state_dict_through_a_torch_optimizer_and_back_keeps_the_masks(ours, theirs, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(70, 40), nn.Linear(40, 3)).to(dtype)
    kw = {"lr": 0.05, **({"momentum": 0.9} if theirs is torch.optim.SGD else {})}
    opt = ours(model.parameters(), **kw)
    opt.prune(0.5)
    x = torch.randn(4, 70, dtype=dtype)
    model(x).float().sum().backward()
    opt.step()
    plain = theirs(model.parameters(), **kw)
    plain.load_state_dict(opt.state_dict())
    back = ours(model.parameters(), **kw)
    back.load_state_dict(plain.state_dict())
    assert back.masks == opt.masks and len(back.masks) == 2


def test_mask_entries_of_the_earlier_int32_format_still_load():
    model = mlp()
    opt = MaskedSGD(model.parameters(), lr=0.05)
    opt.prune(0.5)
    sd = opt.state_dict()
    for i in (0, 2):
        sd["state"][i]["mask"] = sd["state"][i]["mask"].view(torch.int32)
    back = MaskedSGD(model.parameters(), lr=0.05)
    back.load_state_dict(sd)
    assert back.masks == opt.masks


def test_a_rounded_mask_entry_is_refused_by_name():
    model = mlp()
    opt = MaskedSGD(model.parameters(), lr=0.05)
    sd = opt.state_dict()
    sd["state"][0]["mask"] = sd["state"][0]["mask"].float() + 0.5
    with pytest.raises(ValueError, match="mask of parameter 0 is torch.float32"):
        MaskedSGD(model.parameters(), lr=0.05).load_state_dict(sd)


# ------------------------------------------------------------------ 11: copies
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_scheduler_copies_with_its_own_hooks(kind, how):
    model = mlp()
    opt = optimizer(kind, model, lr=1.0)
    dsd = scheduler(opt, model, sparse_lr_scale=0.1)
    dsd.step()
    twin = copy.deepcopy(dsd) if how == "deepcopy" else pickle.loads(pickle.dumps(dsd))
    assert twin.optimizer is not opt and twin.epoch == 1 and twin.lr_scale == 0.1
    assert len(twin.masks) == 2
    held = {id(p) for p in twin.model.parameters()}
    assert all(id(p) in held for p in twin.masks)
    seen = []
    twin.optimizer.register_step_pre_hook(lambda o, a, k: seen.append(float(o.param_groups[0]["lr"])))
    with torch.no_grad():
        for p in twin.model.parameters():
            p.fill_(1.0)
    train_step(twin.model, twin.optimizer)
    assert seen == [pytest.approx(0.1)]
    assert zeros(twin.model) == [64, 32]
    assert zeros(model) == [64, 32]  # the original untouched by the copy's step
    assert float(opt.param_groups[0]["lr"]) == 1.0


# ------------------------------------------------------------------ 13: settings on load
@pytest.mark.parametrize("change", [{"sparse_lr_scale": 0.5}, {"redense_lr_scale": 0.2}, {"scope": "global"},
                                    {"exclude": [r"^2\."]}])
def test_load_refuses_a_state_saved_under_other_settings(change):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    saved = scheduler(opt, model).state_dict()
    other_opt = torch.optim.SGD(model.parameters(), lr=0.05)
    other = scheduler(other_opt, model, **change)
    key = next(iter(change))
    with pytest.raises(ValueError, match=key if key != "exclude" else "selected"):
        other.load_state_dict(saved)


# ------------------------------------------------------------------ 8: argument errors at construction
def test_an_n_m_sparsity_that_some_layers_cannot_take_is_refused_at_construction_naming_them_all():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 5, 1), nn.Conv2d(5, 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"2 selected weight\(s\).*0\.weight \(8, 3, 3, 3\) \(rows of 27.*"
                                         r"2\.weight \(4, 5, 3, 3\) \(rows of 45"):
        scheduler(opt, model, sparsity="2:4")
    scheduler(opt, model, sparsity="2:4", exclude=[r"^[02]\."]).close()  # rows of 8 take 2:4
    sgd = MaskedSGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="without model="), \
            pytest.raises(ValueError, match=r"params\[0\] \(8, 3, 3, 3\)"):
        DSDScheduler(sgd, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity="2:4")


@pytest.mark.parametrize("sparsity,match", [({"^0": "2:4", "^2": 0.5}, "cannot mix N:M"),
                                            ({"^0": 0.3, "^2": 0.5}, r"one sparsity for all.*\[0\.3, 0\.5\]")])
def test_global_scope_with_several_sparsities_is_refused_at_construction(sparsity, match):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        scheduler(opt, model, sparsity=sparsity, scope="global")
    sgd = MaskedSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        sgd.prune(sparsity, model=model, scope="global")
    assert sgd.masks == {}


def test_a_step_whose_prune_raises_changes_nothing():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = scheduler(opt, model, sparsity="2:4")
    model[0].weight.data = torch.randn(16, 6)  # after construction: rows of 6 take no 2:4
    for _ in range(2):  # a retry fails the same way: it never trains on unpruned
        with pytest.raises(ValueError, match="0.weight"):
            dsd.step()
        assert dsd.epoch == 0 and dsd.phase == "dense" and dsd.masks == {} and dsd.mask_changes == 0


# ------------------------------------------------------------------ 9: dict sparsities need names
def test_a_sparsity_dict_without_a_model_says_that_it_needs_one():
    model = mlp()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="picks weights by their names.*model="):
        opt.prune({"0": "2:4", "2": 0.5})
    import dsd_kernels as dk
    with pytest.raises(TypeError, match="picks weights by their names"):
        dk.magnitude_masks([model[0].weight], {"0": 0.5})


def test_sparsify_takes_a_sparsity_dict_by_name():
    import dsd_kernels as dk
    model = dk.nn.sparsify(mlp(), {r"^0\.": "2:4"})
    assert isinstance(model[0], dk.nn.MaskedLinear) and type(model[2]) is nn.Linear
    assert model[0].mask.count() == 64
    model = dk.nn.sparsify(mlp(), {r"^0\.": 0.25, r"^2\.": 0.5})
    assert [model[i].mask.count() for i in (0, 2)] == [96, 32]


# ------------------------------------------------------------------ 12: one rule, clear messages
def test_prune_takes_the_same_sparsities_with_and_without_a_model():
    model = mlp()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    for kwargs in ({}, {"model": model}):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            opt.prune(1.0, **kwargs)
    assert opt.masks == {}
