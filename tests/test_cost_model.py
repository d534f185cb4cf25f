"""The GPU cost model (`dsd-kernels bench --predict`): a roofline over the bytes, FLOPs and
launches each op states, printed as a prediction and never written into the measured results;
the Triton launches it counts are the ones the launchers issue (interpreter on CPU)."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.app import cli
from dsd_kernels.app.bench import cost_model
from dsd_kernels.masks import Mask

from ._helpers.interpreter import require_interpreter_feature


@pytest.mark.parametrize("device", sorted(cost_model.PEAKS))
def test_predictions_are_the_roofline_of_the_counts(device):
    peak = cost_model.PEAKS[device]
    rows = cost_model.predict(device)
    assert {r["op"] for r in rows} == {"magnitude_thresholds", "magnitude_masks", "masked_sgd_", "masked_adamw_",
                                       "apply_masks_", "masked_linear"}
    for r in rows:
        memory, compute = r["bytes"] / peak.bytes_per_s, r["flops"] / peak.bf16_flops_per_s
        assert r["predicted_s"] == max(memory, compute) > 0
        assert r["bound"] == ("memory" if memory >= compute else "compute")
    # large-token block-sparse matmuls are compute-bound, and time falls with the kept tiles
    linear = {r["case"]: r["predicted_s"] for r in rows if r["op"] == "masked_linear"}
    big = [linear[f"8192x4096->11008 {kind} bfloat16"]
           for kind in ("unstructured 50%", "64x64 blocks 50%", "64x64 blocks 75%", "64x64 blocks 90%")]
    assert big == sorted(big, reverse=True)
    adamw = [r for r in rows if r["op"] == "masked_adamw_" and r["case"].startswith("gpt2")][0]
    assert adamw["bytes"] == pytest.approx(124.4e6 * 28.125, rel=1e-3)  # the docstring's 28.125 B/element


def test_cli_prints_predictions_and_writes_no_results(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--predict", "h100", "--ops", "masked_adamw"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PREDICTED (roofline at peak, not measured) for H100 SXM") and "masked_adamw_" in out
    assert not any(tmp_path.rglob("*"))  # nothing written, least of all a results file


def test_cli_names_the_ops_the_model_does_not_cover(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--predict", "h100", "--ops", "nm_masks", "masked_sgd", "--out", "p.json"]) == 2
    err = capsys.readouterr().err
    assert "--predict has no cost model for --ops nm_masks (it covers magnitude_select, masked_sgd" in err
    assert not any(tmp_path.rglob("*"))


def count_host_tables(monkeypatch):
    """Counts the host-built tables copied to the device (kept tables are not copied again)."""
    from dsd_kernels.backends.triton import _tiles, apply_masks, masked_adamw
    _tiles._TABLES.clear()
    calls = []
    real = _tiles.host_table
    for module in (_tiles, masked_adamw, apply_masks):
        if hasattr(module, "host_table"):
            monkeypatch.setattr(module, "host_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.skipif("triton" not in dk.available_backends(), reason="triton backend unavailable")
def test_triton_launch_counts_are_the_models(monkeypatch):
    from dsd_kernels.backends.triton import apply_masks, masked_adamw
    from dsd_kernels.backends.triton._tiles import LAUNCHES
    params = [torch.randn(40, 70), torch.randn(33)]
    words = [Mask.from_bool(torch.rand(40, 70) > 0.5).packed, None]
    zeros = [torch.zeros_like(p) for p in params]
    state = [zeros, [z.clone() for z in zeros], [torch.tensor(0.0), torch.tensor(0.0)]]
    grads = [torch.randn_like(p) for p in params]
    tables = count_host_tables(monkeypatch)

    def adamw_step():
        masked_adamw.masked_adamw_(params, grads, state[0], state[1], [], state[2], words, lr=1e-3, beta1=0.9,
                                   beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)

    adamw_step()  # the first step of these tensors builds every table
    assert len(tables) == 3
    tables.clear()
    before = LAUNCHES.copy()
    adamw_step()  # the steady state: the same tensors, only the step table is new
    assert (LAUNCHES["_masked_adamw_kernel"] - before["_masked_adamw_kernel"], len(tables)) == \
        cost_model.ADAMW_LAUNCHES
    apply_masks.apply_masks_(params[:1], words[:1])
    tables.clear()
    before = LAUNCHES.copy()
    apply_masks.apply_masks_(params[:1], words[:1])
    assert (LAUNCHES["_apply_masks_kernel"] - before["_apply_masks_kernel"], len(tables)) == \
        cost_model.APPLY_MASKS_LAUNCHES
    require_interpreter_feature("loaded_range")  # masked_linear's loop (the counts above stand)
    x, w = torch.randn(8, 128), torch.randn(64, 128)
    mask = dk.magnitude_masks(w, 0.5, block=(64, 64))[0]
    with dk.use_backend("triton"):
        dk.masked_linear(x, w, mask)  # the tile lists of this mask version are built once
        before = LAUNCHES.copy()
        dk.masked_linear(x, w, mask)
    assert dict(LAUNCHES - before) == {"_forward_kernel": cost_model.LINEAR_FORWARD_LAUNCHES[0]}
