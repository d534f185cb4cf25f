"""RigLScheduler (RigL, SET) against a plain-torch reference of both methods: exact dropped and
grown sets at every update, the same weights bit for bit, constant kept counts, fresh state for
grown weights, ERK counts, the cosine schedule, block tiles and mid-run resume."""
import copy
import os
import math

import pytest
import torch
from torch import nn

import dsd_kernels as dk
from dsd_kernels import reference as R
from dsd_kernels.dsd import RigLScheduler
from dsd_kernels.dsd.distribution import erk_densities, layer_pruned_counts
from dsd_kernels.optim import MaskedAdamW, MaskedSGD
from dsd_kernels.reference.mask_update import mask_update as reference_update


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def reference_run(model, make_optimizer, data, *, sparsity, update_every, end_step, drop_fraction, growth, seed):
    """RigL / SET in plain torch: bool masks, gradients and weights masked around each step, the
    update by the sort oracle; returns the masks after every step."""
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    keeps = {p: R.magnitude_masks([p], [sparsity])[0] for p in weights}
    opt = make_optimizer(model.parameters())
    with torch.no_grad():
        for p in weights:
            p.mul_(keeps[p])
    generator = torch.Generator().manual_seed(seed)
    history = []
    for t, (x, y) in enumerate(data, 1):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        dense = {p: p.grad.clone() for p in weights}
        with torch.no_grad():
            for p in weights:
                p.grad.mul_(keeps[p])
            opt.step()
            for p in weights:
                p.mul_(keeps[p])
            if t % update_every == 0 and t < end_step:
                d = drop_fraction / 2 * (1 + math.cos(math.pi * t / end_step))
                for p in weights:
                    k = round(d * int(keeps[p].sum()))
                    score = dense[p] if growth == "gradient" else torch.rand(p.shape, generator=generator,
                                                                             dtype=torch.float64)
                    new = reference_update([p], [score], [keeps[p]], [k])[0]
                    grown = new & ~keeps[p]
                    p.mul_(new)
                    for v in opt.state[p].values():
                        if isinstance(v, torch.Tensor) and v.shape == p.shape:
                            v.mul_(new).masked_fill_(grown, 0)  # moments of a fresh optimizer: 0
                    keeps[p] = new
        history.append({id_: keeps[p].clone() for id_, p in enumerate(weights)})
    return history


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "masked_sgd": lambda params: MaskedSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "masked_adamw": lambda params: MaskedAdamW(params, lr=1e-2),
}
REFERENCE_OF = {"sgd": "sgd", "adam": "adam", "masked_sgd": "sgd",
                "masked_adamw": lambda params: torch.optim.AdamW(params, lr=1e-2)}


def run(model, make_optimizer, data, **settings):
    opt = make_optimizer(model.parameters())
    sched = RigLScheduler(opt, model=model, **settings)
    history = []
    for x, y in data:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        sched.step()
        masks = sched.masks
        history.append({i: masks[m.weight].to_bool() for i, m in enumerate(l for l in model if isinstance(l, nn.Linear))})
    return opt, sched, history


@pytest.mark.parametrize("growth", ["gradient", "random"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_the_plain_torch_reference(name, growth):
    settings = dict(sparsity=0.7, update_every=2, end_step=9, drop_fraction=0.5, growth=growth, seed=5)
    data = batches(11)
    ours, theirs = mlp(), mlp()
    _, sched, history = run(ours, OPTIMIZERS[name], data, **settings)
    ref = REFERENCE_OF[name]
    ref = OPTIMIZERS[ref] if isinstance(ref, str) else ref
    want = reference_run(theirs, ref, data, **settings)
    assert sched.updates == 4  # steps 2, 4, 6, 8 (< end_step 9)
    moved = 0
    for t, (got, exp) in enumerate(zip(history, want), 1):
        for i in exp:
            assert torch.equal(got[i], exp[i]), f"step {t}, layer {i}"
        if t > 1:
            moved += sum(int((history[t - 1][i] != history[t - 2][i]).sum()) for i in exp)
    assert moved > 0  # the masks did change
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    for i, layer in enumerate(l for l in ours if isinstance(l, nn.Linear)):  # kept counts never change
        assert int(history[-1][i].sum()) == layer.weight.numel() - round(0.7 * layer.weight.numel())
        assert int((layer.weight[~history[-1][i]] != 0).sum()) == 0


def test_grown_weights_get_a_fresh_optimizers_state():
    model = mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.25)
    sched = RigLScheduler(opt, model=model, sparsity=0.6, update_every=1, end_step=3, drop_fraction=0.4)
    data = batches(2)
    before = None
    for t, (x, y) in enumerate(data, 1):
        before = {p: m.to_bool() for p, m in sched.masks.items()}
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        assert sched.step()
    for p, mask in sched.masks.items():
        now = mask.to_bool()
        grown, dropped = now & ~before[p], before[p] & ~now
        assert grown.any() and dropped.any()
        assert (opt.state[p]["sum"][grown] == 0.25).all()  # Adagrad's initial accumulator
        assert (p[grown] == 0).all() and (p[dropped] == 0).all()


def test_the_cosine_schedule_and_the_update_steps():
    model = mlp()
    sched = RigLScheduler(MaskedSGD(model.parameters(), lr=0.1), model=model, sparsity=0.5, update_every=3,
                          end_step=10, drop_fraction=0.3)
    assert [t for t in range(1, 15) if sched.update_due(t)] == [3, 6, 9]
    assert sched.drop_fraction_at(0) == pytest.approx(0.3) and sched.drop_fraction_at(10) == pytest.approx(0.0)
    assert sched.drop_fraction_at(5) == pytest.approx(0.15)


def test_erk_counts_are_exact_and_dense_where_erk_asks():
    shapes = [(16, 3, 3, 3), (64, 16, 3, 3), (128, 64, 3, 3), (10, 128)]
    dens = erk_densities(shapes, 0.9)
    assert dens[0] == 1.0  # the small first conv would need a density above 1: dense
    assert all(0 < d < 1 for d in dens[1:3])
    counts = layer_pruned_counts(shapes, [0.9] * 4, "erk")
    total = sum(math.prod(s) for s in shapes)
    assert sum(counts) == round(0.9 * total) and counts[0] == 0
    # ERK: density proportional to (sum of dims) / (product of dims) among the sparse layers
    ratio = [(1 - c / math.prod(s)) / (sum(s) / math.prod(s)) for c, s in zip(counts, shapes) if c]
    assert max(ratio) / min(ratio) == pytest.approx(1.0, rel=1e-3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 64, 3), nn.Conv2d(64, 128, 3), nn.Flatten(),
                          nn.Linear(128, 10))
    sched = RigLScheduler(torch.optim.SGD(model.parameters(), lr=0.1), model=model, sparsity=0.9, end_step=10,
                          distribution="erk")
    pruned = [m.numel - m.count() for m in sched.masks.values()]
    assert sum(pruned) == round(0.9 * sum(p.numel() for p in sched.masks))
    other = mlp()
    with pytest.raises(ValueError, match="erk.*one sparsity"):
        RigLScheduler(torch.optim.SGD(other.parameters(), lr=0.1), model=other, sparsity={"0": 0.5, "2": 0.8},
                      end_step=10, distribution="erk")


@pytest.mark.parametrize("growth", ["gradient", "random"])
@pytest.mark.parametrize("name", ["adam", "masked_sgd"])
def test_resume_mid_run_is_bit_identical(name, growth):
    settings = dict(sparsity=0.6, update_every=2, end_step=11, growth=growth, seed=3)
    data = batches(12)
    straight = mlp()
    run(straight, OPTIMIZERS[name], data, **settings)
    first = mlp()
    opt, sched, _ = run(first, OPTIMIZERS[name], data[:5], **settings)
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict(), "rigl": sched.state_dict()})
    resumed = mlp(seed=9)  # other weights: everything comes from the checkpoint
    opt2 = OPTIMIZERS[name](resumed.parameters())
    sched2 = RigLScheduler(opt2, model=resumed, **settings)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["rigl"])
    for x, y in data[5:]:
        opt2.zero_grad()
        loss_of(resumed, x, y).backward()
        opt2.step()
        sched2.step()
    assert sched2.updates == 5
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    other = mlp()
    with pytest.raises(ValueError, match="growth"):
        RigLScheduler(OPTIMIZERS[name](other.parameters()), model=other, **{**settings, "growth": "random"
                      if growth == "gradient" else "gradient"}).load_state_dict(saved["rigl"])


def test_block_tiles_drop_and_grow_whole_through_the_tile_kernel(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = RigLScheduler(opt, model=model, sparsity=0.5, update_every=2, end_step=7, block=(16, 16),
                          drop_fraction=0.5)
    calls = []
    real = dk.ops.masked_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(dk.ops, "masked_linear", counting)

    def tiles(mask):
        keep = mask.to_bool()
        t = keep.reshape(keep.shape[0] // 16, 16, keep.shape[1] // 16, 16)
        assert torch.equal(t.all(3).all(1), t.any(3).any(1))  # whole tiles only
        return t.any(3).any(1)
    start = {p: tiles(m) for p, m in sched.masks.items()}
    g = torch.Generator().manual_seed(0)
    per_step = []
    for t in range(1, 7):
        calls.clear()
        x = torch.randn(8, 64, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        per_step.append(len(calls))
    # the steps before an update (2, 4, 6) compute dense for the gradient; the others skip tiles
    assert per_step == [2, 0, 2, 0, 2, 0]
    for p, m in sched.masks.items():
        now = tiles(m)
        assert int(now.sum()) == int(start[p].sum()) == round(0.5 * now.numel())
        assert not torch.equal(now, start[p])
        assert (p[~m.to_bool()] == 0).all()


# ---------------------------------------------------------------- FSDP2 (2 gloo ranks)
def _fsdp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 33), nn.ReLU(), nn.Linear(33, 5))  # 33 rows: uneven shards


def _rigl_steps(model, opt, sched, steps=9):
    g = torch.Generator().manual_seed(4)  # every rank the same batches: FSDP2's mean is the batch's gradient
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


RIGL_FSDP = dict(sparsity=0.7, update_every=2, end_step=8, drop_fraction=0.5)


def _fsdp_rigl_worker(rank, world, init_file, out_dir, growth="gradient", kind="adamw"):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    from dsd_kernels._dtensor import full_like

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _fsdp_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        opt = (torch.optim.AdamW(model.parameters(), lr=0.05) if kind == "adamw"
               else MaskedSGD(model.parameters(), lr=0.05, momentum=0.9))
        sched = RigLScheduler(opt, model=model, growth=growth, **RIGL_FSDP)
        _rigl_steps(model, opt, sched)
        masks = [full_like(sched.masks[m.weight].to_bool(), m.weight) for m in model if isinstance(m, nn.Linear)]
        weights = [m.weight.full_tensor().detach() for m in model if isinstance(m, nn.Linear)]
        record = {"masks": masks, "weights": weights, "updates": sched.updates, "fraction": sched.pruned_fraction()}
        torch.save(record, os.path.join(out_dir, f"rigl{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("growth,kind", [("gradient", "adamw"), ("random", "masked_sgd")])
def test_fsdp2_rigl_matches_one_process_with_exact_global_counts(tmp_path, growth, kind):
    import functools
    from .test_distributed import run_ranks
    records = run_ranks(functools.partial(_fsdp_rigl_worker, growth=growth, kind=kind), tmp_path, "rigl")
    model = _fsdp_model()
    opt = (torch.optim.AdamW(model.parameters(), lr=0.05) if kind == "adamw"
           else MaskedSGD(model.parameters(), lr=0.05, momentum=0.9))
    sched = RigLScheduler(opt, model=model, growth=growth, **RIGL_FSDP)
    _rigl_steps(model, opt, sched)
    want = [sched.masks[m.weight].to_bool() for m in model if isinstance(m, nn.Linear)]
    for record in records:  # both ranks: the whole layers' masks, as one process chooses them
        assert record["updates"] == sched.updates == 3
        assert record["fraction"] == pytest.approx(sched.pruned_fraction())
        for ours, theirs, w in zip(record["masks"], want, record["weights"]):
            assert torch.equal(ours, theirs)
            assert int((~ours).sum()) == round(0.7 * ours.numel()) and (w[~ours] == 0).all()
    for ours, theirs in zip(records[0]["weights"], (m.weight for m in model if isinstance(m, nn.Linear))):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DCP reshard (FSDP2, gloo)
DCP_SAVE_AT, DCP_STEPS = 5, 10  # updates at steps 2 and 4 before the save, 6 after (end_step 8)


def _dcp_batch(step):
    g = torch.Generator().manual_seed(50 + step)  # each step's batch by its index: a resumed run sees the same
    return torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)


def _dcp_rigl_setup(rank, world, init_file, kind):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _fsdp_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = (torch.optim.AdamW(model.parameters(), lr=0.05) if kind == "adamw"
           else MaskedSGD(model.parameters(), lr=0.05, momentum=0.9))
    return model, opt, RigLScheduler(opt, model=model, growth="gradient", **RIGL_FSDP)


def _dcp_rigl_steps(model, opt, sched, steps):
    for step in steps:
        x, y = _dcp_batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def _dcp_record(model, sched):
    from dsd_kernels._dtensor import full_like
    layers = [m for m in model if isinstance(m, nn.Linear)]
    return {"masks": [full_like(sched.masks[m.weight].to_bool(), m.weight) for m in layers],
            "weights": [m.weight.full_tensor().detach().clone() for m in layers],
            "updates": sched.updates, "step_count": sched.step_count}


def _dcp_rigl_worker(rank, world, init_file, out_dir, kind, save):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model, opt, sched = _dcp_rigl_setup(rank, world, init_file, kind)
    try:
        ckpt = os.path.join(out_dir, "ckpt")
        if save:
            _dcp_rigl_steps(model, opt, sched, range(DCP_SAVE_AT))
            model_state, optim_state = get_state_dict(model, opt)
            dcp.save({"model": model_state, "optim": optim_state, "rigl": sched.state_dict()}, checkpoint_id=ckpt)
        else:
            model_state, optim_state = get_state_dict(model, opt)
            state = {"model": model_state, "optim": optim_state, "rigl": sched.state_dict()}
            dcp.load(state, checkpoint_id=ckpt)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            sched.load_state_dict(state["rigl"])
        at_save = _dcp_record(model, sched)
        _dcp_rigl_steps(model, opt, sched, range(DCP_SAVE_AT, DCP_STEPS))
        torch.save({"at_save": at_save, "final": _dcp_record(model, sched)},
                   os.path.join(out_dir, f"{'save' if save else 'load'}{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["adamw", "masked_sgd"])
def test_dcp_checkpoint_of_a_rigl_run_reshards(tmp_path, kind):
    """Saved mid-run on 2 ranks with torch's own APIs (get_state_dict, dcp.save), loaded on 1, 2 and
    3: the masks, weights and position come back whatever the world; the run goes on with exact
    counts (2 ranks: bit for bit as the run that saved)."""
    import functools
    from .test_distributed import run_ranks
    saved = run_ranks(functools.partial(_dcp_rigl_worker, kind=kind, save=True), tmp_path, "save")[0]
    assert saved["at_save"]["updates"] == 2 and saved["final"]["updates"] == 3
    for world in (2, 1, 3):
        out = tmp_path / f"world{world}"
        out.mkdir()
        os.symlink(tmp_path / "ckpt", out / "ckpt")
        for record in run_ranks(functools.partial(_dcp_rigl_worker, kind=kind, save=False), out, "load", world=world):
            loaded, final = record["at_save"], record["final"]
            assert (loaded["updates"], loaded["step_count"]) == (2, DCP_SAVE_AT)
            for ours, theirs in zip(loaded["masks"] + loaded["weights"], saved["at_save"]["masks"] + saved["at_save"]["weights"]):
                assert torch.equal(ours, theirs), world
            assert final["updates"] == 3
            for mask, w in zip(final["masks"], final["weights"]):
                assert int((~mask).sum()) == round(0.7 * mask.numel()) and (w[~mask] == 0).all()
            if world == 2:
                for ours, theirs in zip(final["masks"] + final["weights"], saved["final"]["masks"] + saved["final"]["weights"]):
                    assert torch.equal(ours, theirs)
