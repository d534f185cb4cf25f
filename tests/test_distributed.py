"""Sharded magnitude selection with real torch.distributed: 2 gloo processes on CPU."""
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsd_kernels as dk
from dsd_kernels import reference as R

from .conftest import require_backend
from .test_magnitude_select import FLOATS, SPARSITIES as EVERY_SPARSITY, adversarial, large_case

pytestmark = pytest.mark.distributed


def global_tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 19, generator=g)  # uneven: 19 + 18 rows
    b = torch.zeros(8, 3, 3, 3)  # many exact zeros across the shard boundary
    b[0] = torch.randn(3, 3, 3, generator=g)
    b[7, 0] = 1.0
    c = torch.randn(64, 40, generator=g).round(decimals=1)  # ties at the threshold
    d = torch.randn(3, 5, generator=g).double()
    return [a, b, c, d]


SPARSITIES = [0.5, 0.6, 0.37, 0.9]


def run_ranks(worker, tmp_path, name, world=2):
    """worker(rank, world, init_file, out_dir) in `world` processes (each joins a gloo group through
    init_file and saves out_dir/{name}{rank}.pt); returns the ranks' saved results."""
    mp.spawn(_exit_after, args=(worker, world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{name}{r}.pt", weights_only=True) for r in range(world)]


def _exit_after(rank, worker, world, init_file, out_dir):
    """Run worker, then leave without interpreter teardown (its results are on disk, its group
    destroyed). Once in about 40 runs a rank aborted with std::terminate ("terminate called
    without an active exception", what a thread object left joinable raises when destroyed, as at
    teardown); if that abort comes at exit this skips it, if earlier the test still fails. A
    failure inside worker still raises."""
    worker(rank, world, init_file, out_dir)
    os._exit(0)


def select_sharded(mesh, tensors, sparsities):
    """Masks and thresholds of `tensors` sharded on dim 0 over mesh, each call with the list of
    collectives it ran."""
    from torch.distributed.tensor import distribute_tensor

    from dsd_kernels.distributed import COLLECTIVES, Shard
    shards = [distribute_tensor(t, mesh, [Shard(0)]) for t in tensors]
    COLLECTIVES.clear()
    masks = dk.magnitude_masks(shards, sparsities)
    masks_call = list(COLLECTIVES)
    COLLECTIVES.clear()
    thresholds = dk.magnitude_thresholds(shards, sparsities)
    return masks, masks_call, thresholds, list(COLLECTIVES)


def _worker(rank, world, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    from dsd_kernels import _backend
    from dsd_kernels.distributed import Replicate, Shard
    from dsd_kernels.backends.triton._tiles import LAUNCHES

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.tensor import distribute_tensor
        mesh = init_device_mesh("cpu", (world,))
        masks, masks_call, thresholds, thresholds_call = select_sharded(mesh, global_tensors(), SPARSITIES)
        # the kernels that ran: the registry's choice for the sharded selection, and the Triton
        # launches (the histogram kernel runs once per pass when the Triton backend is forced)
        kernels = _backend.resolve("magnitude_select_sharded", torch.device("cpu"), (torch.float32,)).backend
        replicated = dk.magnitude_masks([distribute_tensor(global_tensors()[0], mesh, [Replicate()])], 0.5)
        errors = []
        try:
            dk.magnitude_masks([distribute_tensor(global_tensors()[0], mesh, [Shard(1)])], 0.5)
        except NotImplementedError as err:
            errors.append(str(err))
        torch.save({"masks": [m.to_bool() for m in masks], "thresholds": thresholds,
                    "replicated": replicated[0].to_bool(), "errors": errors,
                    "masks_call": masks_call, "thresholds_call": thresholds_call, "kernels": kernels,
                    "histogram_launches": LAUNCHES["_histogram_kernel"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()  # no rank tears gloo down while a peer still has work in flight
        dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", ["cpp", "torch", "triton"])
def test_sharded_masks_equal_single_process_masks(tmp_path, monkeypatch, backend_name):
    # the per-shard histograms and masks run on the backend the registry picks (forced here
    # through the environment the worker processes inherit)
    require_backend(backend_name)
    monkeypatch.setenv("DSD_KERNELS_BACKEND", backend_name)
    results = run_ranks(_worker, tmp_path, "rank")
    full = global_tensors()
    want_masks = R.magnitude_masks(full, SPARSITIES)
    want_thresholds = R.magnitude_thresholds(full, SPARSITIES)
    for i, want in enumerate(want_masks):
        gathered = torch.cat([r["masks"][i] for r in results])
        assert torch.equal(gathered, want), f"tensor {i}: gathered shard masks differ"
    for r in results:
        assert r["thresholds"].tolist() == pytest.approx(want_thresholds, abs=0)
        assert torch.equal(r["replicated"], want_masks[0])
        assert r["errors"] and "Shard(dim=1)" in r["errors"][0]
        assert r["kernels"] == backend_name
        if backend_name == "triton":
            # the radix path, int64 counts: the fp32 batch of 3 layers in 3 passes of 2048, 1024,
            # 1024 bins, the fp64 layer in 3 of 2048 and 3 of 1024 bins; for the masks the last
            # pass is all_gathered (its bins count each rank's ties) instead of summed
            radix = [3 * 2048 * 8, 3 * 1024 * 8, 3 * 1024 * 8] + [2048 * 8] * 3 + [1024 * 8] * 3
            assert r["thresholds_call"] == [("all_reduce", b) for b in radix]
            last = {2, 8}  # the last pass of each key width
            assert r["masks_call"] == [("all_gather" if n in last else "all_reduce", b) for n, b in enumerate(radix)]
        else:
            # the bracket path: one all_gather of the rows of all 4 tensors (8 + 32 buckets each:
            # these tensors are small, then each shard's window of keys in int64 slots: 64 fp32
            # keys for a and b, 108 for c, all 15 fp64 keys of d); then the mostly-zero tensor b
            # is passed over again with the union of the ranks' brackets (rank 1's bracket is the
            # key 0 alone, rank 0's spans wide buckets: they share no whole bucket); its
            # threshold, 0, ties 81 keys on rank 0 and 99 on rank 1, more than its window holds,
            # so b's bucket keys are exchanged (padded to 99); the other tensors' bucket keys
            # come from the windows. No weight is sent.
            for call in (r["masks_call"], r["thresholds_call"]):
                assert call == [("all_gather", 8 * ((40 + 32) + (40 + 32) + (40 + 54) + (40 + 15))),
                                ("all_gather", 8 * (40 + 32)), ("all_gather", 8 * 99)], call
        # two sharded calls, each one histogram launch per pass (fp32 3 passes, fp64 6), plus
        # the replicated call's local selection (fp32: 3)
        assert r["histogram_launches"] == (2 * (3 + 6) + 3 if backend_name == "triton" else 0)


def uneven_tensors():
    """Shards unlike each other: each rank's own bracket misses the global k-th key."""
    g = torch.Generator().manual_seed(3)
    skewed = torch.randn(600, 512, generator=g)  # 2 x 153600 keys: the large shards' path
    skewed[:300] *= 0.01  # rank 0's half is tiny, rank 1's large: k-th key in neither bracket
    odd = torch.randn(1030, 300, generator=g)  # rows of 300: mask words straddle rows
    odd[515:] *= 3.0
    single = torch.randn(1, 40, generator=g)  # one row: rank 1's shard is empty
    big = torch.randn(1 << 10, 1 << 10, generator=g)  # 2^19 keys per shard: sampled, AVX-512 path
    return [skewed, odd, single, big]


UNEVEN_SPARSITIES = [0.5, 0.3, 0.5, 0.9]


def _select_worker(tensors_fn, sparsities, name, rank, world, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        masks, masks_call, thresholds, thresholds_call = select_sharded(init_device_mesh("cpu", (world,)),
                                                                        tensors_fn(), sparsities)
        torch.save({"masks": [m.to_bool() for m in masks], "thresholds": thresholds, "masks_call": masks_call,
                    "thresholds_call": thresholds_call}, os.path.join(out_dir, f"{name}{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def select_on_two_ranks(tmp_path, tensors_fn, sparsities, name):
    """Masks and thresholds of tensors_fn()'s tensors sharded over 2 gloo ranks, checked against
    the single-process reference; returns the ranks' results (with the collectives of each call)."""
    results = run_ranks(functools.partial(_select_worker, tensors_fn, sparsities, name), tmp_path, name)
    full = tensors_fn()
    for i, want in enumerate(R.magnitude_masks(full, sparsities)):
        assert torch.equal(torch.cat([r["masks"][i] for r in results]), want), f"tensor {i}"
    want_thresholds = R.magnitude_thresholds(full, sparsities)
    for r in results:
        assert r["thresholds"].tolist() == pytest.approx(want_thresholds, abs=0)
    return results


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_sharded_selection_of_unlike_shards_is_exact(tmp_path, monkeypatch, backend_name):
    # the bracket path when the ranks' brackets do not cover the global k-th key (both pass over
    # the union of their brackets), with an empty shard, rows of a length no mask word divides,
    # and shards large enough for the sampled bracket and the vector pass
    require_backend(backend_name)
    monkeypatch.setenv("DSD_KERNELS_BACKEND", backend_name)
    for r in select_on_two_ranks(tmp_path, uneven_tensors, UNEVEN_SPARSITIES, "uneven"):
        # rows of every tensor, the union pass of the skewed ones, the buckets' keys (the windows
        # of unlike shards miss them)
        assert [op for op, _ in r["masks_call"]] == ["all_gather"] * 3, r["masks_call"]


def alike_tensors():
    """Shards alike (as the halves of a weight are): every rank's window holds the threshold's
    bucket, in every key width."""
    g = torch.Generator().manual_seed(5)
    return [torch.randn(1 << 10, 1 << 10, generator=g),  # 2^19 keys per shard: sampled, AVX-512 path
            torch.randn(300, 257, generator=g),  # rows of no whole mask word
            torch.randn(512, 512, generator=g).half(), torch.randn(256, 96, generator=g).bfloat16(),
            torch.randn(128, 130, generator=g).double()]


ALIKE_SPARSITIES = [0.5, 0.9, 0.3, 0.75, 0.5]


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_sharded_selection_of_alike_shards_takes_one_collective(tmp_path, monkeypatch, backend_name):
    # the common case in one round trip: the rows' windows hold every threshold's bucket, so
    # the one all_gather of the rows is the only collective, for masks and for thresholds
    require_backend(backend_name)
    monkeypatch.setenv("DSD_KERNELS_BACKEND", backend_name)
    for r in select_on_two_ranks(tmp_path, alike_tensors, ALIKE_SPARSITIES, "alike"):
        for call in (r["masks_call"], r["thresholds_call"]):
            assert [op for op, _ in call] == ["all_gather"], call


@pytest.mark.parametrize("name", ["cpp", "torch"])
@pytest.mark.parametrize("case", ["random", "sample_misleads", "gather_overflows", "all_equal", "inf_nan", "rounded",
                                  "signed_zeros_and_denormals"])
def test_sharded_selection_of_large_tensors_every_path(name, case, one_rank_mesh):
    # the bracket path's branches on one rank: a sample right, wrong (the union pass, then the
    # radix path), overflowing or full of ties (the radix path), the k-th key inf/NaN, and the
    # bracket reaching either end of the keys
    from torch.distributed.tensor import distribute_tensor

    from dsd_kernels.distributed import Shard
    require_backend(name)
    with dk.use_backend(name):
        for dtype in (torch.float32, torch.float16):
            w = large_case(case, dtype).cpu()
            tensors = [w[:1 << 20].reshape(1024, 1024), w[:1000]]  # rows of whole mask words, and not
            shards = [distribute_tensor(t, one_rank_mesh, [Shard(0)]) for t in tensors]
            for s in (0.5, 0.97, 0.0005, 0.9999):
                masks = dk.magnitude_masks(shards, s)
                for m, x in zip(masks, R.magnitude_masks(tensors, [s, s])):
                    assert torch.equal(m.to_bool(), x), (case, dtype, s)
                got = dk.magnitude_thresholds(shards, s).tolist()
                ref = R.magnitude_thresholds(tensors, [s, s])
                assert [a == b or (a != a and b != b) for a, b in zip(got, ref)] == [True, True], (case, s)


@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_sharded_selection_with_a_crowded_bucket_takes_the_radix_path(name, one_rank_mesh, monkeypatch):
    # a threshold's bucket holding more keys than a rank may send: that tensor alone is selected
    # by the radix path, exactly, the others by the bracket path
    from torch.distributed.tensor import distribute_tensor

    from dsd_kernels import distributed as D
    require_backend(name)
    monkeypatch.setattr(D, "MAX_BUCKET_KEYS", 50)
    radix_calls = []
    radix = D._radix_select
    monkeypatch.setattr(D, "_radix_select", lambda shards, tensors, k, todo, *a: (
        radix_calls.append(list(todo)), radix(shards, tensors, k, todo, *a))[1])
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(64, 64, generator=g).round(decimals=1), torch.randn(50, 7, generator=g)]
    with dk.use_backend(name):
        masks = dk.magnitude_masks([distribute_tensor(t, one_rank_mesh, [D.Shard(0)]) for t in tensors], 0.5)
    for m, want in zip(masks, R.magnitude_masks(tensors, [0.5, 0.5])):
        assert torch.equal(m.to_bool(), want)
    assert radix_calls == [[0]]  # the rounded tensor: about 260 keys tie at its threshold


def train_steps(model, opt, g, *, steps, batch, classes):
    """`steps` optimizer steps of a 12-feature classifier on random batches drawn from g."""
    for _ in range(steps):
        x, y = torch.randn(batch, 12, generator=g), torch.randint(0, classes, (batch,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _ddp_worker(rank, world, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dsd_kernels.dsd import DSDScheduler
    from dsd_kernels.nn import MaskedLinear
    from dsd_kernels.optim import MaskedSGD

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank, as DDP requires
        model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), MaskedLinear(32, 4))
        ddp = DDP(model)
        opt = MaskedSGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        dsd = DSDScheduler(opt, dense_epochs=2, sparse_epochs=2, redense_epochs=2, sparsity=0.5)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        snapshots = {}
        for epoch in range(dsd.total_epochs):
            train_steps(ddp, opt, g, steps=4, batch=16, classes=4)
            if dsd.phase == "sparse":
                snapshots[f"masks{epoch}"] = [m.to_bool() for m in opt.masks.values()]
            dsd.step()
        snapshots["weights"] = [p.detach().clone() for p in model.parameters()]
        # MaskedLinear route: masks live in the modules, any optimizer (Adam) under DDP
        from dsd_kernels.nn import sparsify
        torch.manual_seed(1)
        model2 = sparsify(torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(),
                                              torch.nn.Linear(32, 4)), 0.7, block=(4, 4))
        ddp2 = DDP(model2)
        adam = torch.optim.Adam(ddp2.parameters(), lr=0.01)
        train_steps(ddp2, adam, g, steps=5, batch=16, classes=4)
        snapshots["masked_linear"] = [p.detach().clone() for p in model2.parameters()] + [
            m.mask.to_bool() for m in (model2[0], model2[2])]
        torch.save(snapshots, os.path.join(out_dir, f"ddp{rank}.pt"))
    finally:
        dist.barrier()  # no rank tears gloo down while a peer still has work in flight
        dist.destroy_process_group()


def test_ddp_dsd_training_keeps_ranks_identical(tmp_path):
    a, b = run_ranks(_ddp_worker, tmp_path, "ddp")
    assert set(a) == set(b) and "masks2" in a and "masks3" in a
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), f"{key} differs between ranks"
    assert all(int((~m).sum()) == round(0.5 * m.numel()) for m in a["masks2"])
    w0, mask0 = a["masked_linear"][0], a["masked_linear"][4]
    assert w0[~mask0].eq(0).all()  # pruned weights of the MaskedLinear stayed 0 under Adam + DDP


def _block_dsd_run(model, opt, dsd, batches):
    """Train `model` through dsd's phases, one batch list per epoch; (sparse-phase masks, masked_linear
    calls per phase, final weights)."""
    from dsd_kernels.dsd import tile_layers
    calls = {"dense": 0, "sparse": 0, "redense": 0}
    real = tile_layers.ops.masked_linear

    def counted(*args, **kwargs):  # the real op, counted: which phases compute through it
        calls[dsd.phase] += 1
        return real(*args, **kwargs)
    tile_layers.ops.masked_linear = counted
    masks = None
    try:
        for epoch_batches in batches:
            for x, y in epoch_batches:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            if dsd.phase == "sparse":
                masks = [m.to_bool() for m in dsd.masks.values()]
            dsd.step()
    finally:
        tile_layers.ops.masked_linear = real
    return masks, calls


def _block_batches(seed, rows):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(rows, 130, generator=g), torch.randint(0, 4, (rows,), generator=g)) for _ in range(3)]
            for _ in range(4)]


def _block_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(130, 200), torch.nn.ReLU(), torch.nn.Linear(200, 4))


def _ddp_block_worker(rank, world, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dsd_kernels.dsd import DSDScheduler

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _block_model()
        ddp = DDP(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=0.01)
        dsd = DSDScheduler(opt, model=ddp, dense_epochs=1, sparse_epochs=2, redense_epochs=1, sparsity=0.5,
                           block=(64, 64))
        masks, calls = _block_dsd_run(ddp, opt, dsd, _block_batches(100 + rank, 8))
        torch.save({"masks": masks, "calls": torch.tensor([calls["dense"], calls["sparse"], calls["redense"]]),
                    "weights": [p.detach().clone() for p in model.parameters()]},
                   os.path.join(out_dir, f"ddpblock{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_ddp_block_dsd_matches_one_process_on_the_whole_batch(tmp_path):
    """Block DSD (DSDScheduler(block=(64, 64)), AdamW) under DDP on 2 gloo ranks: the ranks stay
    identical, each weight keeps exactly round(0.5 x tiles) whole tiles, the sparse phase (and only
    it) computes through masked_linear, and the run tracks one process stepping on both ranks'
    batches together (DDP averages the gradients of equal halves)."""
    from dsd_kernels.dsd import DSDScheduler
    a, b = run_ranks(_ddp_block_worker, tmp_path, "ddpblock")
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), f"{key} differs between ranks"
    tiles = {(200, 130): 4 * 3, (4, 200): 1 * 4}
    for m in a["masks"]:
        t = -(-m.shape[0] // 64), -(-m.shape[1] // 64)
        kept_tiles = torch.nn.functional.pad(m.float(), (0, t[1] * 64 - m.shape[1], 0, t[0] * 64 - m.shape[0]))
        kept_tiles = kept_tiles.view(t[0], 64, t[1], 64).amax(dim=(1, 3))
        assert int(kept_tiles.sum()) == tiles[tuple(m.shape)] - round(0.5 * tiles[tuple(m.shape)])
    calls = a["calls"].tolist()
    assert calls[0] == 0 and calls[1] == 2 * 3 * 2 and calls[2] == 0  # 2 layers x 3 steps x 2 epochs
    model = _block_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=2, redense_epochs=1, sparsity=0.5,
                       block=(64, 64))
    halves = zip(_block_batches(100, 8), _block_batches(101, 8))
    whole = [[(torch.cat([x0, x1]), torch.cat([y0, y1])) for (x0, y0), (x1, y1) in zip(e0, e1)] for e0, e1 in halves]
    masks, _ = _block_dsd_run(model, opt, dsd, whole)
    for ours, theirs in zip(a["masks"], masks):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(a["weights"], model.parameters()):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-4, atol=1e-5)


def _fsdp_worker(rank, world, init_file, out_dir, kind="masked_sgd"):
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    from dsd_kernels.dsd import DSDScheduler
    from dsd_kernels.optim import MaskedAdamW, MaskedSGD

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5))
        fully_shard(model, mesh=mesh)
        plan = dict(dense_epochs=1, sparse_epochs=2, redense_epochs=1, sparsity=0.6)
        if kind == "masked_sgd":  # the masks in the optimizer, on its own parameters
            opt = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
            dsd = DSDScheduler(opt, **plan)
        elif kind == "masked_adamw":
            opt = MaskedAdamW(model.parameters(), lr=0.05, weight_decay=1e-2)
            dsd = DSDScheduler(opt, model=model, **plan)
        else:  # any torch optimizer: the masks applied around its step (OptimizerMasks)
            opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1e-2)
            dsd = DSDScheduler(opt, model=model, **plan)
        weights = [p for p in model.parameters() if p.dim() >= 2]
        g = torch.Generator().manual_seed(10 + rank)
        record = {"pruned": [], "lr": []}
        for epoch in range(dsd.total_epochs):
            train_steps(model, opt, g, steps=3, batch=8, classes=5)
            # global count of exact zeros per layer, summed over the shards
            zeros = torch.tensor([int((w.to_local() == 0).sum()) for w in weights])
            dist.all_reduce(zeros)
            record["pruned"].append(zeros.tolist())
            record["lr"].append(opt.param_groups[0]["lr"] * dsd.lr_scale)  # the rate the steps ran at
            dsd.step()
        record["numel"] = [w.numel() for w in weights]
        torch.save(record, os.path.join(out_dir, f"fsdp{rank}.pt"))
    finally:
        dist.barrier()  # no rank tears gloo down while a peer still has work in flight
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["masked_sgd", "masked_adamw", "adamw"])
def test_fsdp2_model_trains_through_dense_sparse_redense(tmp_path, kind):
    """Every optimizer path steps FSDP2's sharded parameters on their local shards with local
    masks: the global per-layer count of zeros is exact at every sparse epoch."""
    import functools
    record = run_ranks(functools.partial(_fsdp_worker, kind=kind), tmp_path, "fsdp")[0]
    exact = [round(0.6 * n) for n in record["numel"]]
    dense, sparse1, sparse2, redense = record["pruned"]
    assert all(z < e for z, e in zip(dense, exact))
    assert sparse1 == exact and sparse2 == exact  # exact global per-layer sparsity, every step
    assert all(z < e // 2 for z, e in zip(redense, exact))  # pruned weights train again
    assert record["lr"] == pytest.approx([0.05, 0.05, 0.05, 0.005])


# one short job per launch mode, shared by the tests below: each launch of torchrun and its
# workers costs seconds of start-up on 2 cores
JOB_ARGS = ["train", "--quick", "--model", "mlp", "--seeds", "1", "--no-progress", "--epochs", "1", "2", "2",
            "--train-samples", "1000", "--checkpoint-every", "1"]


def run_train_job(out, *extra) -> dict:
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "dsd_kernels.app.cli", *JOB_ARGS, *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def train_jobs(tmp_path_factory):
    """Reports of the job in one process and under `--nproc 2` (DDP), made on first use."""
    made = {}

    def get(name: str) -> dict:
        if name not in made:
            extra = {"single": ["--nproc", "1"], "ddp": ["--nproc", "2"]}[name]
            made[name] = run_train_job(tmp_path_factory.mktemp(name), *extra)
        return made[name]
    return get


def assert_tracks_single_process(single: dict, parallel: dict):
    for a, b in zip(single["runs"], parallel["runs"]):
        assert (a["method"], a["seed"]) == (b["method"], b["seed"])
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1.0
        for h1, h2 in zip(a["history"], b["history"]):
            assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-4)
        if a["method"] == "dsd":
            assert b["phases"][1]["measured_sparsity"] == a["phases"][1]["measured_sparsity"]


def test_cli_train_nproc_2_matches_single_process(train_jobs):
    """`dsd-kernels train --nproc 2` (torchrun, gloo): each rank takes its slice of every batch and
    DDP averages the gradients, so the run tracks the single-process one up to float rounding."""
    assert train_jobs("ddp")["config"]["nproc"] == 2
    assert_tracks_single_process(train_jobs("single"), train_jobs("ddp"))


def test_cli_train_nproc_2_uneven_slices_match_single_process(tmp_path):
    """Batches of 3 on 2 ranks: slices of 2 and 1 samples, each weighing by its size."""
    tiny = ["--batch-size", "3", "--train-samples", "9"]
    assert_tracks_single_process(run_train_job(tmp_path / "n1", *tiny, "--nproc", "1"),
                                 run_train_job(tmp_path / "n2", *tiny, "--nproc", "2"))


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A gloo group of this process alone: a Shard(0) DTensor then holds the whole tensor, and
    the sharded selection runs its collectives for real, cheaply, on every adversarial case."""
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_sharded_selection_adversarial_cases_every_backend(backend, dtype, one_rank_mesh):
    from torch.distributed.tensor import distribute_tensor

    from dsd_kernels.distributed import Shard
    for case, tensors in adversarial(dtype).items():
        tensors = [t.cpu() for t in tensors]
        shards = [distribute_tensor(t, one_rank_mesh, [Shard(0)]) for t in tensors]
        for s in EVERY_SPARSITY:
            masks = dk.magnitude_masks(shards, s)
            for i, (m, want) in enumerate(zip(masks, R.magnitude_masks(tensors, [s] * len(tensors)))):
                assert torch.equal(m.to_bool(), want), f"{case}[{i}] at sparsity {s} ({backend})"
            got = dk.magnitude_thresholds(shards, s)
            want = torch.tensor(R.magnitude_thresholds(tensors, [s] * len(tensors)), dtype=got.dtype)
            assert ((got == want) | (got.isnan() & want.isnan())).all(), (case, s, got, want)


def test_gradual_pruning_of_sharded_weights_is_refused_clearly(one_rank_mesh):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    from dsd_kernels.dsd import DSDScheduler
    from dsd_kernels.optim import MaskedSGD
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    fully_shard(model, mesh=one_rank_mesh)
    with pytest.raises(NotImplementedError, match="gradual pruning .* sharded"):
        DSDScheduler(MaskedSGD(model.parameters(), lr=0.1), model=model, dense_epochs=1, sparse_epochs=2,
                     redense_epochs=1, sparsity=0.5, ramp_epochs=2)


def test_cli_train_fsdp_matches_ddp_and_resumes_on_another_nproc(tmp_path, train_jobs):
    """`dsd-kernels train --nproc 2 --fsdp` shards the models with FSDP2: the same losses as the DDP
    job; killed (SIGKILL of torchrun and its workers) after a checkpoint, it resumes with
    `--nproc 1` (checkpoints hold whole state dicts) and ends like the uninterrupted job up to the
    float rounding of one process against two."""
    import json
    import signal
    import subprocess
    import sys
    import time

    args = JOB_ARGS
    reports = {"fsdp": run_train_job(tmp_path / "fsdp", "--nproc", "2", "--fsdp"), "ddp": train_jobs("ddp")}
    assert reports["fsdp"]["config"]["fsdp"] is True
    for a, b in zip(reports["fsdp"]["runs"], reports["ddp"]["runs"]):
        assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]],
                                                                        rel=1e-5)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "dsd_kernels.app.cli", *args, "--nproc", "2", "--fsdp",
                             "--out", killed], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts, deadline = os.path.join(killed, "checkpoints"), time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(n.startswith("dsd") and n.endswith(".pt") for n in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "report.json")), "the job finished before the kill"
    done = subprocess.run([sys.executable, "-m", "dsd_kernels.app.cli", "train", "--resume", killed, "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(killed, "report.json")) as f:
        resumed = json.load(f)
    for a, b in zip(resumed["runs"], reports["fsdp"]["runs"]):
        assert (a["method"], len(a["history"])) == (b["method"], len(b["history"]))
        assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]],
                                                                        rel=1e-3)
        assert [h["sparsity"] for h in a["history"]] == [h["sparsity"] for h in b["history"]]
