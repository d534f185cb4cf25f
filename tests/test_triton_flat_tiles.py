"""The multi-tensor Triton kernels' two addressing paths (interpreter on CPU): tiles of FLAT
segments (rows of whole mask words, or one row; 16-byte aligned tensors) address their elements
as word * 32 + bit so that the compiler can emit vector loads; every other tile goes through the
general row/column path. Both must give the same bits, on full and partial tiles, aligned and
misaligned tensors; which tensors are FLAT is decided on the host (segment_flags)."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.masks import Mask

pytestmark = pytest.mark.skipif("triton" not in dk.available_backends(),
                                reason="triton backend unavailable")

# flat: (5, 64), (100,), (33,), (2, 32, 1, 1); general: (3, 70), (8, 4, 3, 3); plus a misaligned view
SHAPES = [(5, 64), (100,), (3, 70), (33,), (8, 4, 3, 3), (2, 32, 1, 1)]


def misaligned(shape, dtype, gen):
    """A contiguous tensor whose data starts 1 element past a 16-byte boundary."""
    n = torch.Size(shape).numel()
    storage = torch.randn(n + 1, generator=gen, dtype=dtype)
    view = storage[1:].view(shape)
    assert view.data_ptr() % 16 != 0
    return view


def make(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] + [misaligned((4, 64), dtype, gen)]
    keeps = [torch.rand(t.shape, generator=gen) > 0.4 for t in tensors]
    return tensors, [Mask.from_bool(k).packed for k in keeps], keeps


def run_all(dtype, tile_words):
    from dsd_kernels.backends.triton import apply_masks, masked_adamw, masked_sgd
    out = {}
    tensors, words, keeps = make(dtype, 0)
    apply_masks.apply_masks_(tensors, words, tile_words=tile_words)
    out["apply_masks"] = tensors
    params, words, _ = make(dtype, 1)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
    buffers = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
    masked_sgd.masked_sgd_(params, grads, buffers, words, [False] * len(params), lr=0.1, momentum=0.9,
                           dampening=0.1, weight_decay=0.01, nesterov=True, maximize=False,
                           tile_words=tile_words)
    out["masked_sgd"] = params + buffers
    if dtype in (torch.float32, torch.float64):  # the Triton AdamW serves these
        params, words, _ = make(dtype, 2)
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
        m = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
        v = [torch.rand(p.shape, generator=gen, dtype=dtype) for p in params]
        vmax = [x + 0.1 for x in v]
        steps = [torch.tensor(3.0) for _ in params]
        masked_adamw.masked_adamw_(params, grads, m, v, vmax, steps, words, lr=1e-2, beta1=0.9, beta2=0.999,
                                   eps=1e-8, weight_decay=0.01, amsgrad=True, maximize=False,
                                   tile_words=tile_words)
        out["masked_adamw"] = params + m + v + vmax
    return out, keeps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("tile_words", [1, 2, 4])
def test_flat_and_general_addressing_give_the_same_bits(dtype, tile_words, monkeypatch):
    from dsd_kernels.backends.triton import _tiles
    flat, keeps = run_all(dtype, tile_words)
    # the same calls with no segment marked FLAT: every tile takes the general path
    flags = _tiles.segment_flags  # the one place every op's table takes its flags from (segment_tables)
    monkeypatch.setattr(_tiles, "segment_flags", lambda *args: flags(*args) & ~_tiles.FLAT.value)
    general, _ = run_all(dtype, tile_words)
    for op, tensors in flat.items():
        for a, b in zip(tensors, general[op]):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), op
    for t, keep in zip(flat["apply_masks"], keeps):  # and the masking itself is right
        assert torch.equal(t[~keep], torch.zeros_like(t[~keep])) and not t[~keep].signbit().any()


def test_segment_flags():
    from dsd_kernels.backends.triton._tiles import FLAT, HAS_MASK, segment_flags, segment_layout
    def flags(t, has_mask=True):
        cols, words_per_row, num_words = segment_layout(t)
        return segment_flags(has_mask, cols, words_per_row, num_words, [t.data_ptr()])
    assert flags(torch.zeros(5, 64)) == HAS_MASK.value | FLAT.value
    assert flags(torch.zeros(100), has_mask=False) == FLAT.value  # one row
    assert flags(torch.zeros(3, 70)) == HAS_MASK.value  # rows end mid-word
    assert flags(torch.zeros(8, 4, 3, 3)) == HAS_MASK.value
    assert flags(torch.zeros(2, 32, 1, 1)) == HAS_MASK.value | FLAT.value
    assert flags(torch.zeros(65)[1:].view(1, 64)) == HAS_MASK.value  # 4 bytes past alignment
