"""Mask: packed layout, conversions, counting, apply_, devices and serialisation."""
import io

import pytest
import torch

from dsd_kernels import Mask
from dsd_kernels import reference as R

SHAPES = [(1,), (7,), (32,), (33,), (3, 65), (4, 3, 5, 5), (2, 1, 1, 64), (0,), (3, 0)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_matches_reference_and_round_trips(shape):
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    m = Mask.from_bool(keep)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = keep.numel() // rows if rows else 0
    assert m.packed.dtype == torch.int32 and tuple(m.packed.shape) == (rows, (cols + 31) // 32)
    assert torch.equal(m.packed, R.pack_bits(keep))
    assert torch.equal(m.to_bool(), keep)
    assert m.count() == int(keep.sum())


def test_lsb_first_and_bit_31():
    keep = torch.zeros(1, 64, dtype=torch.bool)
    keep[0, 0] = keep[0, 31] = keep[0, 33] = True
    m = Mask.from_bool(keep)
    assert m.packed.tolist() == [[1 - 2**31, 2]]  # bit 0 and bit 31 (sign) | bit 1 of word 1


def test_padding_bits_are_zero():
    m = Mask.from_bool(torch.ones(2, 33, dtype=torch.bool))
    assert m.packed[:, 1].tolist() == [1, 1]
    assert m.count() == 66 and m.sparsity == 0.0


def test_apply_zeroes_pruned_in_place_including_nan():
    w = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 5.0, 6.0]])
    keep = torch.tensor([[True, False, True], [False, True, True]])
    out = Mask.from_bool(keep).apply_(w)
    assert out is w
    assert w.tolist() == [[1.0, 0.0, -2.0], [0.0, 5.0, 6.0]]


def test_apply_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        Mask.from_bool(torch.ones(3, 4, dtype=torch.bool)).apply_(torch.ones(4, 3))


def test_constructor_checks():
    with pytest.raises(TypeError, match="int32"):
        Mask(torch.zeros(1, 1, dtype=torch.int64), (5,))
    with pytest.raises(ValueError, match=r"expected \(1, 1\)"):
        Mask(torch.zeros(2, 1, dtype=torch.int32), (5,))
    with pytest.raises(TypeError, match="bool"):
        Mask.from_bool(torch.ones(3))


def test_save_load_weights_only():
    m = Mask.from_bool(torch.rand(5, 40) > 0.3)
    buf = io.BytesIO()
    torch.save({"mask": m, "state": m.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["mask"] == m
    assert Mask.from_state_dict(loaded["state"]) == m


def test_to_device_and_clone():
    m = Mask.from_bool(torch.rand(4, 9) > 0.5)
    moved = m.to("meta")
    assert moved.device.type == "meta" and moved.shape == m.shape
    c = m.clone()
    assert c == m and c.packed is not m.packed


def test_padding_bits_are_normalised_so_equal_masks_compare_equal():
    keep = torch.rand(3, 40, generator=torch.Generator().manual_seed(2)) > 0.5
    clean = Mask.from_bool(keep)
    dirty_words = clean.packed.clone()
    dirty_words[:, 1] |= 1 << 20  # bits past column 40 of each row's last word
    dirty = Mask(dirty_words, keep.shape)
    assert dirty == clean and dirty.count() == clean.count()
    assert torch.equal(dirty.packed, clean.packed)
    assert dirty_words[0, 1] != clean.packed[0, 1]  # the caller's tensor is left as it was


def test_non_contiguous_words_are_made_contiguous():
    words = torch.zeros(8, 4, dtype=torch.int32)
    words[:, ::2] = -1
    view = words[:, ::2]  # a (8, 2) non-contiguous view
    m = Mask(view, (8, 64))
    assert m.packed.is_contiguous() and torch.equal(m.packed, view)


def test_shape_and_state_dict_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"non-negative sizes, got \(-1,\)"):
        Mask(torch.zeros(1, 1, dtype=torch.int32), [-1])
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        Mask(torch.zeros(1, 1, dtype=torch.int32), "abc")
    with pytest.raises(ValueError, match="lacks 'packed'"):
        Mask.from_state_dict({"shape": [3]})
    with pytest.raises(ValueError, match="lacks 'shape'"):
        Mask.from_state_dict({"packed": torch.zeros(1, 1, dtype=torch.int32)})
    with pytest.raises(TypeError, match="must be a dict"):
        Mask.from_state_dict([1, 2])


def test_float_masks_from_torch_prune_are_accepted():
    from torch.nn.utils import prune

    from dsd_kernels.masks import as_mask
    layer = torch.nn.Linear(40, 7)
    prune.l1_unstructured(layer, "weight", amount=0.4)
    m = as_mask(layer.weight_mask, layer.weight)
    assert torch.equal(m.to_bool(), layer.weight_mask.bool())
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        as_mask(layer.weight_mask * 0.5, layer.weight)
