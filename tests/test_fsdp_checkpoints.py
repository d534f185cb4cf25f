"""Masks through torch.distributed.checkpoint with FSDP2 (gloo, CPU processes), for MaskedSGD,
MaskedAdamW and AdamW + DSDScheduler(model=...): saved mid sparse phase on 2 ranks with nothing but torch's APIs (get_state_dict, dcp.save, dcp.load,
set_state_dict), loaded on 2 ranks (training continues bit-identically), on 1 and on 3 (uneven
shards: weights, masks and optimizer state equal; pruned weights stay 0 while training on)."""
import functools
import os

import pytest
import torch
import torch.distributed as dist

from .test_distributed import run_ranks

pytestmark = pytest.mark.distributed

SAVE_AFTER = 3  # epochs: dense 0, sparse 1-3 (saved after the second sparse epoch), re-dense 4
EPOCHS, STEPS, BATCH = 5, 2, 12


def _setup(rank, world, init_file, kind):
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    from dsd_kernels.dsd import DSDScheduler
    from dsd_kernels.optim import MaskedAdamW, MaskedSGD

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5))
    fully_shard(model, mesh=mesh)
    if kind == "masked_sgd":
        opt = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    elif kind == "masked_adamw":
        opt = MaskedAdamW(model.parameters(), lr=0.02, weight_decay=1e-2)
    else:  # any torch optimizer: the masks in OptimizerMasks, their entries added by its hooks
        opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=3, redense_epochs=1, sparsity=0.6)
    return model, opt, dsd


def _train_epoch(model, opt, epoch, rank, world):
    """Every epoch's batches fixed by the epoch; each rank takes rows rank::world of a batch, its
    loss scaled so FSDP's gradient average is the whole batch's mean on any world size."""
    g = torch.Generator().manual_seed(100 + epoch)
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[rank::world]), y[rank::world], reduction="sum")
        (loss * world / BATCH).backward()
        opt.step()


def _full(state: dict) -> dict:
    """Every tensor of a (nested) sharded state dict as a full tensor, the masks unpacked."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _full(value).items()})
        elif isinstance(value, torch.Tensor):
            # cloned: on one rank full_tensor() may share the live storage
            out[key] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    return out


def _snapshot(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, opt)
    return {**{f"model.{k}": v for k, v in _full(model_state).items()},
            **{f"optim.{k}": v for k, v in _full(optim_state["state"]).items()}}


def _save_worker(rank, world, init_file, out_dir, kind):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model, opt, dsd = _setup(rank, world, init_file, kind)
    try:
        for epoch in range(EPOCHS):
            _train_epoch(model, opt, epoch, rank, world)
            if epoch < EPOCHS - 1:
                dsd.step()
            if epoch + 1 == SAVE_AFTER:
                model_state, optim_state = get_state_dict(model, opt)
                dcp.save({"model": model_state, "optim": optim_state, "dsd": dsd.state_dict()},
                         checkpoint_id=os.path.join(out_dir, "ckpt"))
                saved = _snapshot(model, opt)
        final = _snapshot(model, opt)
        if rank == 0:
            torch.save({"saved": saved, "final": final}, os.path.join(out_dir, f"save{rank}.pt"))
        else:
            torch.save({}, os.path.join(out_dir, f"save{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _load_worker(rank, world, init_file, out_dir, kind):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model, opt, dsd = _setup(rank, world, init_file, kind)
    try:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "dsd": dsd.state_dict()}
        dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
        if world == 3:  # either order restores the masks saved
            dsd.load_state_dict(state["dsd"])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if world != 3:
            dsd.load_state_dict(state["dsd"])
        loaded = _snapshot(model, opt)
        masks_held = len(dsd.masks)
        pruned_zero = []
        for epoch in range(SAVE_AFTER, EPOCHS):
            _train_epoch(model, opt, epoch, rank, world)
            if dsd.phase == "sparse":  # every masked weight's pruned entries still 0
                pruned_zero.append(all(bool((p.to_local()[~m.to_bool()] == 0).all()) for p, m in dsd.masks.items()))
            if epoch < EPOCHS - 1:
                dsd.step()
        final = _snapshot(model, opt)
        torch.save({"loaded": loaded, "final": final, "pruned_zero": pruned_zero, "masks_held": masks_held,
                    "epoch": dsd.epoch}, os.path.join(out_dir, f"load{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=["masked_sgd", "masked_adamw", "adamw"])
def saved(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"dcp-{request.param}")
    record = run_ranks(functools.partial(_save_worker, kind=request.param), out, "save")[0]
    return request.param, out, record


def _mask_keys(snapshot: dict) -> list[str]:
    return [k for k in snapshot if k.endswith(".mask")]


@pytest.mark.parametrize("world", [2, 1, 3])
def test_dcp_round_trip_reshards_masks(saved, tmp_path, world):
    kind, out, record = saved
    ckpt = tmp_path / "ckpt"
    os.symlink(out / "ckpt", ckpt)
    results = run_ranks(functools.partial(_load_worker, kind=kind), tmp_path, "load", world=world)
    loaded = results[0]["loaded"]
    assert _mask_keys(record["saved"]) and set(loaded) == set(record["saved"])
    for key, value in record["saved"].items():  # weights, masks and optimizer state, whatever the world
        assert torch.equal(loaded[key], value), key
    masked = [k for k in _mask_keys(loaded) if k.endswith("weight.mask")]
    assert len(masked) == 2 and all(r["masks_held"] == 2 for r in results)
    assert all(all(r["pruned_zero"]) and len(r["pruned_zero"]) == 1 for r in results)
    if world == 2:  # the same shards: training continues bit for bit
        for key, value in record["final"].items():
            assert torch.equal(results[0]["final"][key], value), key


def _n_m_worker(rank, world, init_file, out_dir):
    model, opt, dsd = _setup(rank, world, init_file, "adamw")
    try:
        dsd.close()
        try:
            from dsd_kernels.dsd import DSDScheduler
            DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity="2:4")
            message = None
        except NotImplementedError as err:
            message = str(err)
        torch.save({"message": message}, os.path.join(out_dir, f"nm{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_n_m_sparsity_of_sharded_weights_is_refused_at_construction(tmp_path):
    results = run_ranks(_n_m_worker, tmp_path, "nm")
    assert all(r["message"] and "N:M sparsity of sharded" in r["message"] and "0.weight" in r["message"]
               for r in results)
