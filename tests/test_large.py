"""A tensor of more than 2^31 elements (int64 offsets end to end), on the C++ backend."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.masks import unpack_bool

pytestmark = pytest.mark.slow

N = 2**31 + 33  # 4 GiB of fp16
PERIOD = 1024  # w[i] = i % 1024: every count, the threshold and each tie are known exactly
CHUNK = 2**24


@pytest.mark.skipif("cpp" not in dk.available_backends(), reason="C++ extension not built")
def test_selection_over_2_pow_31_elements_is_exact():
    w = torch.empty(N, dtype=torch.float16)
    for s in range(0, N, CHUNK):
        e = min(N, s + CHUNK)
        w[s:e] = torch.arange(s, e, dtype=torch.int64).remainder_(PERIOD).to(torch.float16)
    k = round(0.5 * N)
    counts = [N // PERIOD + (1 if v < N % PERIOD else 0) for v in range(PERIOD)]
    below, threshold = 0, 0
    while below + counts[threshold] < k:
        below += counts[threshold]
        threshold += 1
    need = k - below  # ties at the threshold pruned, lowest index first
    with dk.use_backend("cpp"):
        assert float(dk.magnitude_thresholds(w, 0.5)[0]) == threshold
        mask = dk.magnitude_masks(w, 0.5)[0]
    assert mask.packed.shape == (1, (N + 31) // 32)
    last_pruned_tie = threshold + PERIOD * (need - 1)  # index of the need-th element equal to T
    pruned_total = 0
    for s in range(0, N, CHUNK):  # CHUNK is a multiple of 32: whole words
        e = min(N, s + CHUNK)
        keep = unpack_bool(mask.packed[:, s // 32:(e + 31) // 32], (1, (e + 31) // 32 * 32 - s))[0, :e - s]
        idx = torch.arange(s, e, dtype=torch.int64)
        value = idx % PERIOD
        expected = (value > threshold) | ((value == threshold) & (idx > last_pruned_tie))
        assert torch.equal(keep, expected), f"chunk at {s}"
        pruned_total += int((~keep).sum())
    assert pruned_total == k
