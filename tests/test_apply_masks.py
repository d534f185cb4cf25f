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
