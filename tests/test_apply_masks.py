"""apply_masks_ (the re-masking around any optimizer's step): every backend against the
reference in every float dtype, NaN and -0.0, channels_last in place; the op's checks, real
and traced."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import reference as R

from .conftest import DEVICE


def test_apply_masks_matches_reference_on_every_backend(backend):
    g = torch.Generator().manual_seed(4)
    # rows of whole mask words (fp32 on AVX-512 takes them as one long row: several parallel
    # chunks for (1100, 64)) and rows ending inside a word
    shapes = [(33, 70), (7,), (4, 3, 3, 3), (1, 1), (1100, 64), (64,), (5, 40)]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        tensors = [torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in shapes]
        tensors[0][0, :5] = float("nan")
        tensors[4][::3, 7] = float("nan")
        tensors[6][:, 33] = -0.0  # pruned: +0, kept: -0 stays
        keeps = [(torch.rand(s, generator=g) > 0.5).to(DEVICE) for s in shapes]
        want = [t.clone() for t in tensors]
        R.apply_masks_(want, keeps)
        dk.apply_masks_(tensors, [dk.Mask.from_bool(k) for k in keeps])
        for t, w in zip(tensors, want):
            assert torch.equal(t.view(torch.uint8) if t.dtype != torch.bfloat16 else t.view(torch.int16),
                               w.view(torch.uint8) if w.dtype != torch.bfloat16 else w.view(torch.int16))
    conv = torch.randn(8, 4, 3, 3, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    keep = (torch.rand(8, 4, 3, 3, generator=g) > 0.5).to(DEVICE)
    ptr = conv.data_ptr()
    dk.apply_masks_([conv], [keep])
    assert conv.data_ptr() == ptr and conv.is_contiguous(memory_format=torch.channels_last)
    assert bool((conv[~keep] == 0).all()) and bool((conv[keep] != 0).all())


@pytest.mark.parametrize("shape", [(40, 96), (9, 70), (3, 200)])
def test_words_that_keep_everything_or_nothing(backend, shape):
    """Masks with whole words kept, whole words pruned and mixed words (rows of whole words and
    rows ending inside one): kept entries untouched (NaN and -0.0 included), pruned ones +0."""
    g = torch.Generator().manual_seed(sum(shape))
    t = torch.randn(shape, generator=g)
    t[:, ::7] = float("nan")
    t[:, 1::5] = -0.0
    runs = torch.rand(shape[0], -(-shape[1] // 16), generator=g)  # 16-column runs: all, none or mixed
    kind = torch.where(runs < 0.35, 0, torch.where(runs < 0.7, 1, 2)).repeat_interleave(16, 1)[:, :shape[1]]
    keep = torch.where(kind == 2, torch.rand(shape, generator=g) > 0.5, kind == 1)
    want = t.clone()
    R.apply_masks_([want], [keep])
    got = t.clone().to(DEVICE)
    dk.apply_masks_([got], [dk.Mask.from_bool(keep.to(DEVICE))])
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))


def test_apply_masks_op_checks_its_inputs_real_and_traced():
    t = torch.zeros(4, 40)
    with pytest.raises(ValueError, match=r"mask_words\[0\] does not fit tensors\[0\]"):
        torch.ops.dsd_kernels.apply_masks_([t], [torch.zeros(4, 1, dtype=torch.int32)])
    torch.library.opcheck(torch.ops.dsd_kernels.apply_masks_.default,
                          ([torch.randn(4, 40)], [dk.Mask.from_bool(torch.rand(4, 40) > 0.5).packed]))
    from torch._subclasses.fake_tensor import FakeTensorMode
    words = torch.zeros(4, 1, dtype=torch.int32)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="does not fit"):
        torch.ops.dsd_kernels.apply_masks_([mode.from_tensor(t)], [mode.from_tensor(words)])


def test_the_common_call_skips_the_custom_op_and_the_rest_keeps_it():
    # contiguous tensors of their own storage with Masks go to the backend directly (no custom-op
    # dispatch: the host cost of a call over many small tensors); bool masks, or two tensors in one
    # storage, take the op with its checks; both give the reference's bits
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(5)

    def dispatched(tensors, masks):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dk.apply_masks_(tensors, masks)
        return any(e.name == "dsd_kernels::apply_masks_" for e in prof.events())

    shapes = [(16, 40), (33,), (2, 3, 5)]
    keeps = [torch.rand(s, generator=g) > 0.5 for s in shapes]
    tensors = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]  # leaves needing grad
    want = [t.detach().clone() for t in tensors]
    R.apply_masks_(want, keeps)
    assert not dispatched(tensors, [dk.Mask.from_bool(k) for k in keeps[:2]] + [None])
    want[2] = tensors[2].detach().clone()  # None: left as is
    R.apply_masks_(want[2:], keeps[2:])
    assert not dispatched(tensors[2:], [dk.Mask.from_bool(keeps[2])])
    assert all(torch.equal(t.detach(), w) for t, w in zip(tensors, want))

    storage = torch.randn(2, 16, 40, generator=g)
    halves, keep = list(storage.unbind(0)), keeps[0]
    want = [h.clone() for h in halves]
    R.apply_masks_(want, [keep, keep])
    assert dispatched(halves, [dk.Mask.from_bool(keep)] * 2)
    assert dispatched([torch.randn(16, 40)], [keep])  # a bool mask
    assert all(torch.equal(h, w) for h, w in zip(halves, want))
    with pytest.raises(ValueError, match="shares memory"):  # the same tensor twice: the op's check
        dk.apply_masks_([halves[0], halves[0]], [dk.Mask.from_bool(keep)] * 2)


def test_a_dtype_the_kernels_do_not_take_is_refused_with_a_mask_too():
    # float8 is floating but no kernel takes it: the common call's shortcut leaves it to the op's check
    t = torch.zeros(4, 40).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"mask_words\[0\] does not fit tensors\[0\]"):
        dk.apply_masks_([t], [dk.Mask.from_bool(torch.rand(4, 40) > 0.5)])
