"""Gradual (cubic) pruning inside the sparse phase: DSDScheduler(ramp_epochs=R, ramp_every=E)
prunes n = R/E times, the k-th to exactly round(s_k * numel) with s_k = s * (1 - (1 - k/n)^3),
growing the masks (the survivors' smallest |w|, the selection's tie rule); with any optimizer,
scope="global", unit="step", the callbacks and checkpoint/resume mid-ramp."""
import pytest
import torch
from torch import nn

from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.dsd.plan import ramp_fraction
from dsd_kernels.optim import MaskedAdamW, MaskedSGD


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))
    g = torch.Generator().manual_seed(seed + 1)
    return model, [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(3)]


def epoch(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def weights(model):
    return [m.weight for m in model if isinstance(m, nn.Linear)]


def survivors_smallest_pruned(w_before: torch.Tensor, kept_before: torch.Tensor, kept_after: torch.Tensor) -> bool:
    """The newly pruned entries are the survivors' smallest |w|, lower index first among ties."""
    flat, before, after = w_before.reshape(-1), kept_before.reshape(-1), kept_after.reshape(-1)
    survivors = before.nonzero().squeeze(1)
    order = torch.sort(flat[survivors].abs().double(), stable=True).indices
    newly = int((before & ~after).sum())
    want = torch.ones_like(before)
    want[~before] = False
    want[survivors[order[:newly]]] = False
    return torch.equal(want, after)


def test_ramp_schedule():
    model, _ = model_and_data()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=7, redense_epochs=1, sparsity=0.8,
                       ramp_epochs=6, ramp_every=2)
    assert dsd.ramp_updates() == [(0, ramp_fraction(1, 3)), (2, ramp_fraction(2, 3)), (4, 1.0)]
    assert ramp_fraction(1, 3) == pytest.approx(1 - (2 / 3) ** 3)


@pytest.mark.parametrize("optimizer", ["masked_sgd", "adam", "masked_adamw"])
def test_each_update_prunes_exactly_and_masks_only_grow(optimizer):
    model, batches = model_and_data()
    make = {"masked_sgd": lambda p: MaskedSGD(p, lr=0.05, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2), "masked_adamw": lambda p: MaskedAdamW(p, lr=1e-2)}
    opt = make[optimizer](model.parameters())
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=7, redense_epochs=1, sparsity=0.8,
                       ramp_epochs=6, ramp_every=2)
    shares = dict(dsd.ramp_updates())
    kept = {w: torch.ones_like(w, dtype=torch.bool) for w in weights(model)}
    for unit in range(dsd.total_epochs - 1):
        epoch(model, opt, batches)
        before = {w: w.detach().clone() for w in weights(model)}
        dsd.step()
        offset = dsd.epoch - 1  # sparse unit about to run
        if dsd.phase == "sparse" and offset in shares:
            for w in weights(model):
                now = dsd.masks[w].to_bool()
                assert int((~now).sum()) == round(0.8 * shares[offset] * w.numel())
                assert not bool((now & ~kept[w]).any())  # a mask only grows
                assert survivors_smallest_pruned(before[w], kept[w], now)
                assert bool((w[~now] == 0).all())
                kept[w] = now
        if dsd.phase == "sparse":  # between updates the masks hold
            for w in weights(model):
                assert torch.equal(dsd.masks[w].to_bool(), kept[w])
    assert dsd.phase == "redense" and dsd.masks == {}
    assert all(int((~k).sum()) == round(0.8 * k.numel()) for k in kept.values())  # s_f reached


def test_global_scope_ramp_counts_over_all_weights():
    model, batches = model_and_data()
    opt = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=4, redense_epochs=1, sparsity=0.7,
                       ramp_epochs=4, scope="global")
    total = sum(w.numel() for w in weights(model))
    previous = None
    for k in range(1, 5):
        epoch(model, opt, batches)
        dsd.step()
        pruned = {w: ~dsd.masks[w].to_bool() for w in weights(model)}
        assert sum(int(p.sum()) for p in pruned.values()) == round(0.7 * ramp_fraction(k, 4) * total)
        if previous is not None:
            assert all(bool((previous[w] & ~pruned[w]).sum() == 0) for w in pruned)
        previous = pruned


def test_unit_step_and_no_model():
    model, batches = model_and_data()
    opt = MaskedSGD(model.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="without model="):
        dsd = DSDScheduler(opt, dense_epochs=2, sparse_epochs=6, redense_epochs=2, sparsity=0.5,
                           ramp_epochs=6, ramp_every=3, unit="step")
    counts = []
    for _ in range(dsd.total_epochs - 1):
        epoch(model, opt, batches[:1])
        dsd.step()
        counts.append(sum(m.numel - m.count() for m in dsd.masks.values()))
    total = sum(w.numel() for w in weights(model))
    s1 = sum(round(0.5 * ramp_fraction(1, 2) * w.numel()) for w in weights(model))
    assert counts == [0, s1, s1, s1, round(0.5 * total), round(0.5 * total), round(0.5 * total), 0, 0]


def test_resume_mid_ramp_is_bit_identical():
    def build():
        model, batches = model_and_data()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=6, redense_epochs=1, sparsity=0.6,
                           ramp_epochs=6, ramp_every=2)
        return model, opt, dsd, batches

    model, opt, dsd, batches = build()
    saved = None
    for unit in range(dsd.total_epochs):
        epoch(model, opt, batches)
        if unit == 3:  # after the second of three updates
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                     "opt": opt.state_dict(), "dsd": dsd.state_dict()}
            saved = torch.load(_roundtrip(saved), weights_only=True)
        if dsd.epoch < dsd.total_epochs - 1:
            dsd.step()
    model2, opt2, dsd2, _ = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    dsd2.load_state_dict(saved["dsd"])
    dsd2.step()
    for unit in range(4, dsd2.total_epochs):
        epoch(model2, opt2, batches)
        if dsd2.epoch < dsd2.total_epochs - 1:
            dsd2.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def _roundtrip(obj):
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_ramp_state_must_match():
    model, _ = model_and_data()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    plan = dict(model=model, dense_epochs=1, sparse_epochs=4, redense_epochs=1, sparsity=0.5)
    state = DSDScheduler(opt, **plan, ramp_epochs=4).state_dict()
    with pytest.raises(ValueError, match="ramp_epochs=4"):
        DSDScheduler(opt, **plan).load_state_dict(state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ramp_epochs=0), "ramp_epochs must be a positive integer"),
    (dict(ramp_epochs=2.0), "ramp_epochs must be a positive integer"),
    (dict(ramp_epochs=4, ramp_every=3), "multiple of ramp_every=3"),
    (dict(ramp_epochs=5), "longer than the sparse phase"),
    (dict(ramp_every=2), "ramp_every needs ramp_epochs"),
    (dict(ramp_epochs=4, sparsity="2:4"), "needs a fractional sparsity.*'2:4'"),
    (dict(ramp_epochs=4, sparsity={"0": 0.5, "2": "1:4"}), "needs a fractional sparsity"),
])
def test_bad_ramp_arguments(kwargs, match):
    model, _ = model_and_data()
    args = {**dict(model=model, dense_epochs=1, sparse_epochs=4, redense_epochs=1, sparsity=0.5), **kwargs}
    with pytest.raises(ValueError, match=match):
        DSDScheduler(MaskedSGD(model.parameters(), lr=0.1), **args)
