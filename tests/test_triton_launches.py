"""Launch budgets and tiling of the Triton kernels (interpreter on CPU): the batched radix select, masked SGD, masked_linear and re-masking."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import reference as R

from ._helpers.interpreter import require_interpreter_feature
from .conftest import DEVICE

pytestmark = pytest.mark.skipif("triton" not in dk.available_backends(),
                                reason="triton backend unavailable")


def launches_of(fn) -> dict:
    from dsd_kernels.backends.triton._tiles import LAUNCHES
    before = LAUNCHES.copy()
    fn()
    return dict(LAUNCHES - before)


def test_launches_do_not_grow_with_layer_count():
    from dsd_kernels.backends.triton import magnitude_select as T
    for layers in (1, 12):
        tensors = [torch.randn(64, 33, device=DEVICE) for _ in range(layers)]
        # fp32: 3 radix passes x (histogram + select) + tie count + mask
        assert launches_of(lambda: T.magnitude_select(
            tensors, [0.5] * layers, want_masks=True, out_dtype=torch.float32)) == {
            "_histogram_kernel": 3, "_select_kernel": 3, "_tie_count_kernel": 1, "_mask_kernel": 1}
        assert launches_of(lambda: T.magnitude_select(
            tensors, [0.5] * layers, want_masks=False, out_dtype=torch.float32)) == {
            "_histogram_kernel": 3, "_select_kernel": 3}
        # mixed dtypes: one batch of launches per dtype
        mixed = tensors + [t.double() for t in tensors]
        assert launches_of(lambda: T.magnitude_select(
            mixed, [0.5] * 2 * layers, want_masks=False, out_dtype=torch.float64)) == {
            "_histogram_kernel": 3 + 6, "_select_kernel": 3 + 6}


def test_masked_sgd_is_one_launch_per_dtype_for_a_whole_group():
    from dsd_kernels import ops
    params = [torch.randn(s, device=DEVICE) for s in [(7, 3), (130,), (4, 4, 3, 3)]] * 3
    params = [p.clone() for p in params] + [p.double() for p in params[:2]]
    grads = [torch.randn_like(p) for p in params]
    masks = [dk.Mask.from_bool(torch.rand(p.shape, device=DEVICE) > 0.5) if p.dim() > 1 else None
             for p in params]
    with dk.use_backend("triton"):
        assert launches_of(lambda: ops.masked_sgd_(params, grads, None, masks, lr=0.1,
                                                   momentum=0.9)) == {"_masked_sgd_kernel": 2}


def test_masked_linear_launches():
    require_interpreter_feature("loaded_range")
    from dsd_kernels import ops
    x = torch.randn(5, 70, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 70, device=DEVICE, requires_grad=True)
    keep = torch.rand(40, 70, device=DEVICE) > 0.5
    with dk.use_backend("triton"):
        y = None

        def forward():
            nonlocal y
            y = ops.masked_linear(x, w, keep)
        assert launches_of(forward) == {"_forward_kernel": 1}
        assert launches_of(lambda: y.sum().backward()) == {"_grad_input_kernel": 1,
                                                            "_grad_weight_kernel": 1}


@pytest.mark.parametrize("tile_words", [1, 2, 8])
def test_ties_split_across_tiles(tile_words):
    from dsd_kernels.backends.triton import magnitude_select as T
    w = torch.ones(37, 70, device=DEVICE)
    w[5:9] = 0.5
    for s in (0.01, 0.3, 0.77):
        _, packed = T.magnitude_select([w], [s], want_masks=True, out_dtype=torch.float32,
                                       tile_words=tile_words)
        ref = R.magnitude_masks([w.cpu()], [s])[0]
        assert torch.equal(packed[0].cpu(), R.pack_bits(ref))


def test_tile_words_must_be_power_of_two():
    from dsd_kernels.backends.triton import magnitude_select as T
    with pytest.raises(ValueError, match="tile_words"):
        T.magnitude_select([torch.randn(8, device=DEVICE)], [0.5], want_masks=False,
                           out_dtype=torch.float32, tile_words=3)


def test_apply_masks_is_one_launch_per_dtype():
    from dsd_kernels import ops
    tensors = [torch.randn(s, device=DEVICE) for s in [(7, 3), (130, 2), (4, 4, 3, 3)]]
    tensors += [t.double() for t in tensors]
    masks = [dk.Mask.from_bool(torch.rand(t.shape, device=DEVICE) > 0.5) for t in tensors]
    with dk.use_backend("triton"):
        assert launches_of(lambda: ops.apply_masks_(tensors, masks)) == {"_apply_masks_kernel": 2}
