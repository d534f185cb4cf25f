"""Launch budget and tiling of the batched Triton radix select (interpreter on CPU)."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import reference as R

from .conftest import DEVICE

pytestmark = pytest.mark.skipif("triton" not in dk.available_backends(),
                                reason="triton backend unavailable")


def test_launches_do_not_grow_with_layer_count():
    from dsd_kernels.triton import radix_select as T
    for layers in (1, 12):
        tensors = [torch.randn(64, 33, device=DEVICE) for _ in range(layers)]
        before = T.LAUNCHES[0]
        T.magnitude_select(tensors, [0.5] * layers, want_masks=True, out_dtype=torch.float32)
        # fp32: 3 radix passes x (histogram + select) + tie count + mask
        assert T.LAUNCHES[0] - before == 8
        before = T.LAUNCHES[0]
        T.magnitude_select(tensors, [0.5] * layers, want_masks=False, out_dtype=torch.float32)
        assert T.LAUNCHES[0] - before == 6


@pytest.mark.parametrize("tile_words", [1, 2, 8])
def test_ties_split_across_tiles(tile_words):
    from dsd_kernels.triton import radix_select as T
    w = torch.ones(37, 70, device=DEVICE)
    w[5:9] = 0.5
    for s in (0.01, 0.3, 0.77):
        _, packed = T.magnitude_select([w], [s], want_masks=True, out_dtype=torch.float32,
                                       tile_words=tile_words)
        ref = R.magnitude_keep_masks([w.cpu()], [s])[0]
        assert torch.equal(packed[0].cpu(), R.pack_bits(ref))


def test_tile_words_must_be_power_of_two():
    from dsd_kernels.triton import radix_select as T
    with pytest.raises(ValueError, match="tile_words"):
        T.magnitude_select([torch.randn(8, device=DEVICE)], [0.5], want_masks=False,
                           out_dtype=torch.float32, tile_words=3)
