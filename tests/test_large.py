"""A tensor of more than 2^31 elements (int64 offsets end to end), on the C++ backend."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.masks import unpack_bool

pytestmark = pytest.mark.slow

N = 2**31 + 33  # 4 GiB of fp16
PERIOD = 1024  # w[i] = i % 1024: every count, the threshold and each tie are known exactly
WORDS_PER_PERIOD = PERIOD // 32


def expected_keep(start: int, stop: int, threshold: int, last_pruned_tie: int) -> torch.Tensor:
    idx = torch.arange(start, stop, dtype=torch.int64)
    value = idx % PERIOD
    return (value > threshold) | ((value == threshold) & (idx > last_pruned_tie))


@pytest.mark.skipif("cpp" not in dk.available_backends(), reason="C++ extension not built")
def test_selection_over_2_pow_31_elements_is_exact():
    periods, tail = divmod(N, PERIOD)
    pattern = torch.arange(PERIOD).to(torch.float16)
    w = torch.empty(N, dtype=torch.float16)
    w[:periods * PERIOD].view(periods, PERIOD).copy_(pattern)
    w[periods * PERIOD:] = pattern[:tail]
    k = round(0.5 * N)
    counts = [periods + (1 if v < tail else 0) for v in range(PERIOD)]
    below, threshold = 0, 0
    while below + counts[threshold] < k:
        below += counts[threshold]
        threshold += 1
    need = k - below  # ties at the threshold pruned, lowest index first: those of periods 0..need-1
    assert 0 < need < periods
    last_pruned_tie = threshold + PERIOD * (need - 1)
    with dk.use_backend("cpp"):
        assert float(dk.magnitude_thresholds(w, 0.5)[0]) == threshold
        mask = dk.magnitude_masks(w, 0.5)[0]
    assert mask.packed.shape == (1, (N + 31) // 32)
    # every bit is checked: each period's 32 words equal those of the first period on its side of
    # the last pruned tie, whose bits (and the tail's) are compared with the rule element by element
    words = mask.packed[0, :periods * WORDS_PER_PERIOD].view(periods, WORDS_PER_PERIOD)
    for first, stop in ((0, need), (need, periods)):
        same = (words[first:stop] == words[first]).all(dim=1)
        assert same.all(), f"period {first + int((~same).nonzero()[0])} differs from period {first}"
        keep = unpack_bool(words[first:first + 1], (1, PERIOD))[0]
        assert torch.equal(keep, expected_keep(first * PERIOD, (first + 1) * PERIOD, threshold, last_pruned_tie))
    tail_words = mask.packed[:, periods * WORDS_PER_PERIOD:]
    tail_keep = unpack_bool(tail_words, (1, tail_words.shape[1] * 32))[0, :tail]
    assert torch.equal(tail_keep, expected_keep(periods * PERIOD, N, threshold, last_pruned_tie))
    pruned_per_period = [int((~unpack_bool(words[i:i + 1], (1, PERIOD))).sum()) for i in (0, need)]
    pruned_total = need * pruned_per_period[0] + (periods - need) * pruned_per_period[1] + int((~tail_keep).sum())
    assert pruned_total == k
