"""Block DSD on the tile-skipping matmul (issue 39, item 1): DSDScheduler(block=(bh, bw)) prunes
exactly round(s * tiles) whole tiles per weight; while sparse, every pruned nn.Linear computes
through masked_linear (and only then); no module is swapped (state_dict keys and parameters stay
the same); pruned weights and optimizer state are 0; resume mid-phase is bit-identical; every
optimizer; the callbacks' argument and the train job's --block."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.optim import MaskedAdamW, MaskedSGD

KINDS = ["masked_sgd", "masked_adamw", "adam"]
BLOCK = (16, 32)


def stack(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 80), nn.GELU(), nn.Linear(80, 48), nn.GELU(), nn.Linear(48, 10))


def optimizer(kind, model):
    if kind == "masked_sgd":
        return MaskedSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    if kind == "masked_adamw":
        return MaskedAdamW(model.parameters(), lr=1e-2)
    return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)


def schedule(opt, model, sparsity=0.5, **kw):
    return DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=2, redense_epochs=1, sparsity=sparsity,
                        block=BLOCK, **kw)


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 96, generator=g), torch.randint(0, 10, (12,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def tiles_kept(keep: torch.Tensor) -> torch.Tensor:
    """Per (bh, bw) tile (edge tiles partial), whether it keeps any weight."""
    bh, bw = BLOCK
    rows, cols = keep.shape
    padded = torch.zeros(-(-rows // bh) * bh, -(-cols // bw) * bw, dtype=torch.bool)
    padded[:rows, :cols] = keep
    return padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw).any(3).any(1)


def tile_kernel_calls(model, opt, seed) -> int:
    with torch.profiler.profile() as prof:
        train_step(model, opt, seed)
    return sum(e.count for e in prof.key_averages() if e.key == "dsd_kernels::masked_linear")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_whole_tiles_pruned_exactly_and_the_tile_kernel_only_while_sparse(kind, sparsity):
    model = stack()
    opt = optimizer(kind, model)
    dsd = schedule(opt, model, sparsity)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    assert tile_kernel_calls(model, opt, 0) == 0
    assert dsd.step() == "sparse"
    for layer in model[0::2]:
        keep = dsd.masks[layer.weight].to_bool()
        tiles = tiles_kept(keep)
        assert int((~tiles).sum()) == round(sparsity * tiles.numel())
        # whole tiles: a kept tile keeps every weight of it
        assert bool(keep.eq(tiles.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
                            [:keep.shape[0], :keep.shape[1]]).all())
    for seed in (1, 2):
        assert tile_kernel_calls(model, opt, seed) == 3  # forward of every Linear (backward inside)
        for layer in model[0::2]:
            pruned = ~dsd.masks[layer.weight].to_bool()
            assert bool((layer.weight[pruned] == 0).all())
            for value in opt.state[layer.weight].values():
                if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                    assert bool((value[pruned] == 0).all())
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert all(type(layer) is nn.Linear for layer in model[0::2])
    dsd.step()
    assert dsd.step() == "redense"
    assert tile_kernel_calls(model, opt, 3) == 0
    assert list(model.state_dict()) == keys


def test_dense_phases_compute_the_bits_of_nn_linear():
    model, plain = stack(), stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule(opt, model)
    x = torch.randn(5, 96)
    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_sparse_phase_is_bit_identical(kind):
    def build():
        model = stack()
        opt = optimizer(kind, model)
        return model, opt, schedule(opt, model)

    model, opt, dsd = build()
    train_step(model, opt, 0)
    dsd.step()
    train_step(model, opt, 1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dsd": dsd.state_dict()}, buffer)
    for seed in (2, 3):
        train_step(model, opt, seed)
    dsd.step()
    train_step(model, opt, 4)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2, dsd2 = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    dsd2.load_state_dict(saved["dsd"])
    assert tile_kernel_calls(model2, opt2, 2) == 3
    train_step(model2, opt2, 3)
    dsd2.step()
    train_step(model2, opt2, 4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_layers_the_tile_kernel_does_not_serve_are_named_in_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"2 selected layer\(s\) have no tile-skipping matmul.*0, 1") as record:
        dsd = schedule(opt, model)
    assert len([w for w in record if "tile-skipping" in str(w.message)]) == 1
    dsd.step()
    conv = model[1].weight
    assert 0.4 < dsd.masks[conv].sparsity < 0.6
    with torch.profiler.profile() as prof:
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert sum(e.count for e in prof.key_averages() if e.key == "dsd_kernels::masked_linear") == 1


@pytest.mark.parametrize("kwargs,match", [({"sparsity": "2:4"}, "N:M"), ({"ramp_epochs": 1}, "gradual"),
                                          ({"scope": "global"}, "scope='layer'"),
                                          ({"block": (0, 4)}, "two positive ints")])
def test_block_arguments_are_checked_at_construction(kwargs, match):
    model = stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"sparsity": 0.5, "block": BLOCK, **kwargs}
    with pytest.raises(ValueError, match=match):
        DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=2, redense_epochs=1, **kwargs)


def test_close_puts_back_nn_linear_forward_and_a_copy_skips_tiles_on_its_own():
    model = stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = schedule(opt, model)
    dsd.step()
    twin = copy.deepcopy(dsd)
    assert tile_kernel_calls(twin.model, twin.optimizer, 0) == 3
    assert tile_kernel_calls(model, opt, 0) == 3
    dsd.close()
    assert "forward" not in model[0].__dict__ and tile_kernel_calls(model, opt, 0) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy.deepcopy(model)(torch.randn(2, 96))


def test_a_saved_block_state_needs_a_block_scheduler():
    model = stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = schedule(opt, model).state_dict()
    other = DSDScheduler(torch.optim.SGD(model.parameters(), lr=0.1), model=model, dense_epochs=1,
                         sparse_epochs=2, redense_epochs=1, sparsity=0.5)
    with pytest.raises(ValueError, match="block"):
        other.load_state_dict(state)


def test_the_train_job_takes_block(tmp_path, capsys):
    import json
    from dsd_kernels.app import cli
    out = tmp_path / "job"
    assert cli.main(["train", "--quick", "--model", "mlp", "--seeds", "1", "--epochs", "1", "1", "1",
                     "--block", "16", "16", "--out", str(out), "--no-progress"]) == 0
    assert "of 16x16 tiles" in (out / "report.md").read_text()
    assert json.loads((out / "config.json").read_text())["block"] == [16, 16]
    assert cli.main(["train", "--block", "16", "16", "--sparsity", "2:4", "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    assert "--block" in capsys.readouterr().err


@pytest.mark.parametrize("trainer", ["lightning", "transformers"])
def test_both_callbacks_take_block(trainer):
    pytest.importorskip("lightning" if trainer == "lightning" else "transformers")
    import importlib
    callback_cls = importlib.import_module(f"dsd_kernels.integrations.{trainer}").DSDCallback
    with pytest.raises(ValueError, match="N:M"):  # checked when the callback is built
        callback_cls("2:4", 1, 1, 1, block=BLOCK)
    callback = callback_cls(0.5, 1, 1, 1, block=BLOCK)
    model = stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback.start(opt, model, None)  # what both do when training begins
    assert callback.scheduler.block == BLOCK and len(callback.scheduler.tile_linears) == 3
    callback.advance_to(1)
    assert tile_kernel_calls(model, opt, 0) == 3


def test_hugging_face_conv1d_computes_through_the_tile_kernel():
    """GPT-2's Conv1D layers (weight stored (in, out)) skip pruned tiles while sparse: the output
    and gradients match the dense module on the masked weights, exact tile counts, state_dict keys
    unchanged, and no warning of layers the tile kernel does not serve."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=96, n_layer=1, n_head=2, n_positions=16, vocab_size=50,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    keys = list(model.state_dict())
    reference = copy.deepcopy(model)  # computes dense: its weights get the same masks below
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dsd = schedule(opt, model, include=["transformer.h"])
    assert not [w for w in record if "tile-skipping" in str(w.message)]
    conv1ds = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(conv1ds) == 4 and all(m in dsd.tile_linears for m in conv1ds)
    dsd.step()  # dense -> sparse
    for m in conv1ds:
        keep = dsd.masks[m.weight].to_bool()
        tiles = tiles_kept(keep.t())  # BLOCK's tiles of the (out, in) weight
        assert int((~tiles).sum()) == round(0.5 * tiles.numel())
        assert m.weight[~keep].eq(0).all()
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            q.copy_(p)
    ids = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.profiler.profile() as prof:
        loss = model(ids, labels=ids).loss
        loss.backward()
    calls = sum(e.count for e in prof.key_averages() if e.key == "dsd_kernels::masked_linear")
    assert calls == 4
    want = reference(ids, labels=ids).loss
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for m, r in zip(conv1ds, [m for m in reference.modules() if isinstance(m, Conv1D)]):
        keep = dsd.masks[m.weight].to_bool()
        torch.testing.assert_close(m.weight.grad, r.weight.grad * keep, rtol=1e-4, atol=1e-5)
        assert m.weight.grad[~keep].eq(0).all()
        torch.testing.assert_close(m.bias.grad, r.bias.grad, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == keys
    dsd.step()
    dsd.step()  # re-dense: dense compute again
    with torch.profiler.profile() as prof:
        model(ids, labels=ids).loss.backward()
    assert sum(e.count for e in prof.key_averages() if e.key == "dsd_kernels::masked_linear") == 0


def test_a_sparsity_dict_prunes_each_pattern_by_its_own_share_of_tiles():
    """block= with per-pattern sparsities (a dict, as DSDScheduler takes them): each weight keeps
    exactly round(s x tiles) tiles at its own pattern's s, and every pruned layer skips tiles."""
    model = stack()
    opt = optimizer("adam", model)
    dsd = schedule(opt, model, sparsity={"0": 0.25, "2": 0.75, "4": 0.5})
    dsd.step()
    for index, s in ((0, 0.25), (2, 0.75), (4, 0.5)):
        tiles = tiles_kept(dsd.masks[model[index].weight].to_bool())
        assert int((~tiles).sum()) == round(s * tiles.numel()), index
    assert tile_kernel_calls(model, opt, 1) == 3
