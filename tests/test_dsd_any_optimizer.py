"""DSD with any torch optimizer and any module holding a weight: scope, tied weights, re-masking
around any optimizer (OptimizerMasks), step-based phases, strip_masks."""
import warnings

import pytest
import torch
from torch import nn

import dsd_kernels as dk
from dsd_kernels import reference as R
from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.nn import MaskedLinear, sparsify, strip_masks
from dsd_kernels.optim import OptimizerMasks
from dsd_kernels.scope import select

from .conftest import DEVICE

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-3),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2),
}


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: y = x @ W + b with W of shape (in, out)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class TinyLM(nn.Module):
    def __init__(self, vocab=40, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Conv1D(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied, as language models do

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        h = self.proj(torch.relu(self.mlp(self.norm(h))))
        return self.head(h)


def train_step(model, opt, g):
    tokens = torch.randint(0, 40, (8, 6), generator=g).to(DEVICE)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(1, 1).flatten())
    loss.backward()
    opt.step()


def state_tensors(opt, p):
    return [v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.shape == p.shape]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dsd_with_every_torch_optimizer(name):
    torch.manual_seed(0)
    model = TinyLM().to(DEVICE)
    opt = OPTIMIZERS[name](model.parameters())
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=2, redense_epochs=1, sparsity=0.5)
    pruned_layers = {"conv": model.conv.weight, "mlp": model.mlp.weight, "proj": model.proj.weight}
    assert {s.name for s in dsd.selected} == {"conv.weight", "mlp.weight", "proj.weight"}
    untouched = {"emb": model.emb.weight, "norm": model.norm.weight}
    g = torch.Generator().manual_seed(1)
    lr0 = opt.param_groups[0]["lr"]
    where = None
    for epoch in range(dsd.total_epochs):
        for _ in range(2):
            train_step(model, opt, g)
            if dsd.phase == "sparse":  # pruned weights exactly 0 after every step
                for key, w in pruned_layers.items():
                    assert bool((w[where[key]] == 0).all()), f"{name}: {key} revived"
                    assert int((w == 0).sum()) >= round(0.5 * w.numel())
        entered = dsd.step()
        if entered == "sparse":
            where = {k: (~dsd.optimizer_masks.masks[w].to_bool()) for k, w in pruned_layers.items()}
            for key, w in pruned_layers.items():
                assert int(where[key].sum()) == round(0.5 * w.numel()), key
                assert bool((w[where[key]] == 0).all())
                for state in state_tensors(opt, w):  # the optimizer's state zeroed where pruned
                    assert bool((state[where[key]] == 0).all()), f"{name}: {key} state"
            for key, w in untouched.items():
                assert int((w == 0).sum()) == 0, f"{key} must stay dense by default"
        elif entered == "redense":
            assert opt.param_groups[0]["lr"] == lr0 and dsd.lr_scale == pytest.approx(0.1)
            assert dsd.optimizer_masks.masks == {}
            for key, w in pruned_layers.items():  # fresh state where pruned: what a new optimizer holds
                fresh = OPTIMIZERS[name]([nn.Parameter(torch.zeros_like(w))])
                fresh.param_groups[0]["params"][0].grad = torch.zeros_like(w)
                fresh.step()
                fresh_state = fresh.state[fresh.param_groups[0]["params"][0]]
                for k, state in opt.state[w].items():
                    if isinstance(state, torch.Tensor) and state.shape == w.shape:
                        assert torch.equal(state[where[key]], fresh_state[k][where[key]]), f"{name}: {key} {k}"
    assert any(int((w[where[k]] != 0).sum()) > 0 for k, w in pruned_layers.items()), \
        f"{name}: pruned weights must train again after re-dense"


def test_a_tied_weight_included_is_pruned_once_and_stays_zero():
    torch.manual_seed(0)
    model = TinyLM().to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1,
                       sparsity={r"emb|head": 0.6, r"proj": 0.3}, include=[nn.Embedding, nn.Linear])
    assert sorted((s.name, s.sparsity) for s in dsd.selected) == [("emb.weight", 0.6), ("proj.weight", 0.3)]
    g = torch.Generator().manual_seed(2)
    train_step(model, opt, g)
    dsd.step()
    tied = model.emb.weight
    assert model.head.weight is tied and len(dsd.optimizer_masks.masks) == 2
    pruned = ~dsd.optimizer_masks.masks[tied].to_bool()
    assert int(pruned.sum()) == round(0.6 * tied.numel())
    for _ in range(3):  # gradients reach the tied weight through the embedding and the head
        train_step(model, opt, g)
        assert bool((tied[pruned] == 0).all())


def test_scope_rules_and_errors():
    model = TinyLM()
    assert [s.name for s in select(model, 0.5, exclude=[r"^proj"])] == ["conv.weight", "mlp.weight"]
    assert [s.name for s in select(model, 0.5, include=[Conv1D])] == ["mlp.weight"]
    assert [s.name for s in select(model, {"conv": 0.2, "mlp": 0.7})] == ["conv.weight", "mlp.weight"]
    with pytest.raises(ValueError, match=r"include\[0\] is not a valid regular expression"):
        select(model, 0.5, include=["(unclosed"])
    with pytest.raises(TypeError, match=r"exclude\[0\] must be a module type or a regular expression"):
        select(model, 0.5, exclude=[3])
    with pytest.raises(ValueError, match=r"sparsity\['conv'\] must be in \[0, 1\)"):
        select(model, {"conv": 1.0})
    with pytest.raises(TypeError, match="pass model="):
        DSDScheduler(torch.optim.Adam(model.parameters()), dense_epochs=1, sparse_epochs=1,
                     redense_epochs=1, sparsity=0.5)
    with pytest.raises(ValueError, match="the optimizer does not hold conv.weight"):
        DSDScheduler(torch.optim.Adam(model.proj.parameters()), model=model, dense_epochs=1,
                     sparse_epochs=1, redense_epochs=1, sparsity=0.5, include=[nn.Conv2d])


def test_global_scope_prunes_exactly_round_s_total_with_one_threshold():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1,
                       sparsity=0.5, scope="global")
    weights = [s.param for s in dsd.selected]
    flat = torch.cat([w.detach().reshape(-1) for w in weights])
    want = R.magnitude_masks([flat], [0.5])[0]
    dsd.step()
    got = torch.cat([dsd.optimizer_masks.masks[w].to_bool().reshape(-1) for w in weights])
    assert torch.equal(got, want) and int((~got).sum()) == round(0.5 * flat.numel())


def test_step_unit_phases_and_resume_with_masks():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=3, sparse_epochs=4, redense_epochs=2,
                       sparsity=0.5, unit="step")
    g = torch.Generator().manual_seed(3)
    phases = []
    for _ in range(5):
        train_step(model, opt, g)
        phases.append(dsd.step())
    assert phases == [None, None, "sparse", None, None]
    state = dsd.state_dict()
    assert state["unit"] == "step" and state["masks"]
    twin = DSDScheduler(torch.optim.Adam(model.parameters(), lr=1e-2), model=model, dense_epochs=3,
                        sparse_epochs=4, redense_epochs=2, sparsity=0.5, unit="step")
    twin.load_state_dict(state)
    assert twin.phase == "sparse" and {k: v for k, v in twin.optimizer_masks.masks.items()} == \
        dsd.optimizer_masks.masks
    dsd.close()  # one scheduler per optimizer at a time
    with pytest.raises(ValueError, match="unit='step' but this scheduler has 'epoch'"):
        DSDScheduler(opt, model=model, dense_epochs=3, sparse_epochs=4, redense_epochs=2,
                     sparsity=0.5).load_state_dict(state)


def test_masked_linear_modules_keep_their_masks_under_any_optimizer():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)), 0.0)
    model.add_module("extra", nn.Conv1d(1, 1, 3))  # not a MaskedLinear: masked by the hooks
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5)
    dsd.step()
    assert all(m.mask is not None for m in (model[0], model[2]))
    assert set(dsd.optimizer_masks.masks) == {model.extra.weight}


def test_strip_masks_gives_plain_modules_that_load_strictly():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    model = sparsify(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)), 0.5)
    x = torch.randn(5, 12)
    y = model(x)
    stripped = strip_masks(model)
    assert not any(isinstance(m, MaskedLinear) for m in stripped.modules())
    original.load_state_dict(stripped.state_dict(), strict=True)
    torch.testing.assert_close(original(x), y)
    assert int((original[0].weight == 0).sum()) == round(0.5 * 12 * 32)


def test_optimizer_masks_rejects_foreign_params():
    opt = torch.optim.Adam([nn.Parameter(torch.randn(3, 3))])
    masks = OptimizerMasks(opt)
    with pytest.raises(ValueError, match="does not hold"):
        masks.set_masks({nn.Parameter(torch.randn(3, 3)): torch.ones(3, 3, dtype=torch.bool)})
    masks.remove()


class Drift(torch.optim.Optimizer):
    """A third-party optimizer that moves every weight whatever its gradient: only the re-masking
    after the step keeps pruned weights at 0 under it."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.01})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["velocity"] = state.get("velocity", torch.zeros_like(p)) + 1.0
                p.add_(state["velocity"], alpha=group["lr"])


def test_a_third_party_optimizer_cannot_revive_pruned_weights():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Drift(model.parameters())
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5)
    dsd.step()
    pruned = {w: ~m.to_bool() for w, m in dsd.optimizer_masks.masks.items()}
    assert all(bool((opt.state[w]["velocity"][where] == 0).all()) for w, where in pruned.items()
               if w in opt.state)
    for _ in range(3):
        opt.step()
        for w, where in pruned.items():
            assert bool((w[where] == 0).all())
    dsd.step()  # re-dense: the drift moves them again, from 0
    opt.step()
    assert all(bool((w[where] != 0).all()) for w, where in pruned.items())


def test_summary_lists_every_weight_with_its_scope_and_mask():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5)
    dsd.step()
    lines = dk.summary(model, dsd).splitlines()
    assert lines[0].split() == ["weight", "module", "shape", "elements", "zeros", "scheduler's", "scope", "mask"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"emb.weight", "conv.weight", "mlp.weight", "proj.weight"}  # head is emb's
    assert rows["emb.weight"][-2:] == ["dense", "-"]
    assert rows["proj.weight"][-3:] == ["50.0%", "pruned", "optimizer"]


def test_masked_sgd_prune_takes_the_scope_arguments():
    from dsd_kernels.optim import MaskedSGD
    torch.manual_seed(0)
    model = TinyLM()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    masks = opt.prune({"conv": 0.25, "mlp": 0.75}, model=model)
    assert set(masks) == {model.conv.weight, model.mlp.weight}
    for w, s in ((model.conv.weight, 0.25), (model.mlp.weight, 0.75)):
        assert masks[w].numel - masks[w].count() == round(s * w.numel())
    assert int((model.emb.weight == 0).sum()) == 0  # the tied embedding is out by default
    with pytest.raises(TypeError, match="need model="):
        opt.prune(0.5, include=[nn.Linear])


def test_torch_prune_reparametrisations_are_taken_over():
    from torch.nn.utils import prune

    from dsd_kernels.scope import adopt_torch_prune
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Conv1d(20, 4, 1))
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # holds weight_orig, as users have it
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    masks = adopt_torch_prune(model)
    assert {id(p) for p in masks} <= held and not hasattr(model[0], "weight_orig")
    assert [m.numel - m.count() for m in masks.values()] == [80, 40]
    om = OptimizerMasks(opt)
    om.set_masks(masks)
    for _ in range(3):
        opt.zero_grad()
        hidden = torch.relu(model[0](torch.randn(6, 10)))
        model[2](hidden.unsqueeze(-1)).sum().backward()  # Conv1d over a length-1 sequence
        opt.step()
    for p, m in masks.items():
        assert bool((p[~m.to_bool()] == 0).all())


def test_sparsify_follows_the_scope_and_names_what_it_cannot_convert():
    torch.manual_seed(0)
    model = TinyLM()
    with pytest.warns(UserWarning, match=r"sparsify converts nn.Linear only; 2 other selected modules "
                                         r"keep dense matmuls \(conv, mlp\)"):
        sparsify(model, 0.5)
    assert isinstance(model.proj, MaskedLinear)
    assert not isinstance(model.head, MaskedLinear)  # tied to the embedding: out by default
    assert int((model.emb.weight == 0).sum()) == 0


def test_hugging_face_round_trip_keeps_the_zeros(tmp_path):
    pytest.importorskip("transformers", reason="the transformers extra")
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=2, redense_epochs=1, sparsity=0.5)
    assert len(dsd.selected) == 8  # the 8 Conv1D weights; the tied wte/lm_head stays dense
    tokens = torch.randint(0, 50, (4, 12))
    for epoch in range(2):
        opt.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        dsd.step()
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    for s in dsd.selected:
        assert int((dict(loaded.named_parameters())[s.name] == 0).sum()) == round(0.5 * s.param.numel())


def test_masks_of_any_optimizer_travel_in_its_state_dict():
    """OptimizerMasks adds a "mask" entry per prunable weight to the optimizer's own state dict
    (the form torch.distributed.checkpoint reshards) and takes it back on load; entries a plain
    optimizer loaded before the hooks existed are dropped, not kept as state."""
    from dsd_kernels.optim import OptimizerMasks
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=2, redense_epochs=1, sparsity=0.5)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    dense_state = opt.state_dict()
    assert all(bool((dense_state["state"][i]["mask"] != 0).any()) for i in (0, 2))  # every weight kept
    dsd.step()
    state = opt.state_dict()
    assert "mask" not in state["state"][1] and torch.equal(state["state"][0]["mask"].view(torch.int32),
                                                       dsd.masks[model[0].weight].packed)
    assert "mask" not in opt.state[model[0].weight]  # the live state never holds it
    twin = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 3))
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    masks = OptimizerMasks(twin_opt, params=[twin[0].weight, twin[2].weight])
    twin_opt.load_state_dict(state)
    assert masks.masks[twin[0].weight] == dsd.masks[model[0].weight] and len(masks.masks) == 2
    assert "mask" not in twin_opt.state[twin[0].weight]
    early = torch.optim.AdamW(nn.Linear(8, 40).parameters(), lr=1e-2)
    early.load_state_dict({"state": {0: state["state"][0]}, "param_groups": [{**state["param_groups"][0],
                                                                              "params": [0, 1]}]})
    assert "mask" in early.state[early.param_groups[0]["params"][0]]  # torch kept it, cast to floats
    OptimizerMasks(early)
    assert "mask" not in early.state[early.param_groups[0]["params"][0]]


def test_summary_shows_the_schedulers_own_scope_also_while_dense():
    """With a DSDScheduler the scope column is the weights that scheduler prunes (its include /
    exclude), before its first prune too; without one, the default scope."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5,
                       exclude=["proj"])
    rows = {line.split()[0]: line.split() for line in dk.summary(model, dsd).splitlines()[1:]}
    assert rows["proj.weight"][-2:] == ["dense", "-"] and rows["mlp.weight"][-2:] == ["pruned", "-"]
    default = {line.split()[0]: line.split() for line in dk.summary(model).splitlines()[1:]}
    assert default["proj.weight"][-2] == "pruned"


def test_masked_sgd_prune_without_model_warns_as_the_scheduler_does():
    from dsd_kernels.optim import MaskedSGD
    model = TinyLM()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"MaskedSGD.prune without model=.*embeddings and norms included") as rec:
        opt.prune(0.5)
    assert rec[0].filename == __file__  # pointed at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.prune(0.5, model=model)
