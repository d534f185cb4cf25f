"""Direct torch.ops calls with tensors whose memory the kernels cannot walk (expanded, transposed,
overlapping): a clear error naming the argument, the same on every backend, in the compiled ops
(torch.ops.dsd_kernels_cpp.*) too; and the wrappers, which take any layout, refuse what they
cannot write in place."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.masks import packed_shape


def _sgd_op(params, grads, bufs, words=None):
    words = [None] * len(params) if words is None else words
    torch.ops.dsd_kernels.masked_sgd_(params, grads, bufs, words, [False] * len(bufs), 0.1, 0.9, 0.0, 0.0,
                                      False, False)


def _adamw_op(params, grads, exp_avgs, exp_avg_sqs):
    n = len(params)
    torch.ops.dsd_kernels.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, [],
                                        [torch.tensor(0.0) for _ in range(n)], [None] * n, 0.1, 0.9, 0.999,
                                        1e-8, 0.0, False, False)


BAD_BUFFERS = {
    "expanded": (lambda: torch.zeros(1, 64).expand(2000, 64), (2000, 64), r"momentum_buffers\[0\] must be a contiguous"),
    "transposed": (lambda: torch.randn(6, 4).t(), (4, 6), r"momentum_buffers\[0\] must be a contiguous"),
    "gapped": (lambda: torch.randn(4, 12)[:, ::2], (4, 6), r"momentum_buffers\[0\] must be a contiguous"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUFFERS))
def test_masked_sgd_op_refuses_buffers_it_cannot_walk(cpu_backend, case):
    make, shape, message = BAD_BUFFERS[case]
    p, g, b = torch.randn(shape), torch.randn(shape), make()
    before = p.clone(), b.clone()
    with pytest.raises(ValueError, match=message):
        _sgd_op([p], [g], [b])
    assert torch.equal(p, before[0]) and torch.equal(b, before[1])  # nothing written


@pytest.mark.parametrize("which", ["params-buffer", "params-grads", "buffer-grads"])
def test_masked_sgd_op_refuses_shared_memory(cpu_backend, which):
    p, g, b = torch.randn(8, 5), torch.randn(8, 5), torch.randn(8, 5)
    args = {"params-buffer": ([p], [g], [p]), "params-grads": ([p], [p], [b]), "buffer-grads": ([p], [g], [g])}
    with pytest.raises(ValueError, match="shares memory with"):
        _sgd_op(*args[which])


def test_masked_sgd_op_refuses_overlap_across_parameters(cpu_backend):
    storage = torch.randn(100)
    p0, p1 = storage[:60].view(6, 10), storage[50:].view(5, 10)  # rows 5 of p0 and 0 of p1 are one memory
    with pytest.raises(ValueError, match=r"params\[\d\] shares memory with params\[\d\]"):
        _sgd_op([p0, p1], [torch.randn(6, 10), torch.randn(5, 10)], [torch.randn(6, 10), torch.randn(5, 10)])


def test_list_ops_refuse_non_contiguous_and_shared(cpu_backend):
    p = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must be a contiguous"):
        _adamw_op([p], [torch.randn(4, 6)], [torch.zeros(1, 6).expand(4, 6)], [torch.zeros(4, 6)])
    with pytest.raises(ValueError, match=r"shares memory"):
        _adamw_op([p], [torch.randn(4, 6)], [p], [torch.zeros(4, 6)])
    words = torch.zeros(packed_shape(p.shape), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"tensors\[0\] must be a contiguous"):
        torch.ops.dsd_kernels.apply_masks_([torch.randn(6, 4).t()], [words])
    with pytest.raises(ValueError, match=r"tensors\[\d\] shares memory with tensors\[\d\]"):
        torch.ops.dsd_kernels.apply_masks_([p, p.view(-1)[:12].view(2, 6)], [words, torch.zeros(2, 1, dtype=torch.int32)])


def test_fake_implementations_check_layouts_too():
    with torch._subclasses.FakeTensorMode():
        p, g = torch.empty(4, 6), torch.empty(4, 6)
        with pytest.raises(ValueError, match=r"momentum_buffers\[0\] must be a contiguous"):
            _sgd_op([p], [g], [torch.empty(6, 4).t()])


@pytest.fixture
def cpp_ops():
    if "cpp" not in dk.available_backends():
        pytest.skip(f"cpp backend unavailable: {dk._backend.reasons()['cpp']}")
    import dsd_kernels._C  # noqa: F401  registers torch.ops.dsd_kernels_cpp
    return torch.ops.dsd_kernels_cpp


def test_compiled_sgd_guards_its_own_arguments(cpp_ops):
    """The segfault of the report: an expanded (2000, 64) buffer passed to the compiled kernel."""
    p, g = torch.randn(2000, 64), torch.randn(2000, 64)
    call = lambda params, grads, bufs: cpp_ops.masked_sgd_(params, grads, bufs, [None], [False], 0.1, 0.9, 0.0,
                                                           0.0, False, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] must be contiguous"):
        call([p], [g], [torch.zeros(1, 64).expand(2000, 64)])
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] must be contiguous"):
        call([p], [g], [torch.randn(64, 2000).t()])
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] and params\[0\] share memory"):
        call([p], [g], [p])
    with pytest.raises(RuntimeError, match=r"params\[0\] and grads\[0\] share memory"):
        call([p], [p], [g])
    with pytest.raises(RuntimeError, match=r"mask_words\[0\] does not fit params\[0\]"):
        cpp_ops.masked_sgd_([p], [g], [torch.zeros_like(p)], [torch.zeros(3, dtype=torch.int32)], [False], 0.1,
                            0.9, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"params\[0\] is Long"):
        cpp_ops.masked_sgd_([torch.zeros(3, dtype=torch.long)], [torch.zeros(3, dtype=torch.long)], [], [None], [],
                            0.1, 0.0, 0.0, 0.0, False, False)


def test_compiled_adamw_and_linear_guard_their_arguments(cpp_ops):
    p, g = torch.randn(40, 8), torch.randn(40, 8)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] must be contiguous"):
        cpp_ops.masked_adamw_([p], [g], [torch.zeros(1, 8).expand(40, 8)], [torch.zeros_like(p)], [], [None],
                              [0.1], [1.0], 0.1, 0.9, 0.999, 1e-8, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] and exp_avgs\[0\] share memory|exp_avgs\[0\] and "
                                           r"exp_avg_sqs\[0\] share memory"):
        state = torch.zeros_like(p)
        cpp_ops.masked_adamw_([p], [g], [state], [state], [], [None], [0.1], [1.0], 0.1, 0.9, 0.999, 1e-8, 0.0,
                              False, False)
    w, words = torch.randn(8, 40), torch.zeros(8, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"x must be a strided \(rows, 40\)"):
        cpp_ops.masked_linear_forward(torch.randn(3, 41), w, words, None, None)
    with pytest.raises(RuntimeError, match=r"x must be a strided \(rows, 40\)"):
        cpp_ops.masked_linear_forward(torch.randn(3, 40).double(), w, words, None, None)
    with pytest.raises(RuntimeError, match=r"bias must be a \(8,\)"):
        cpp_ops.masked_linear_forward(torch.randn(3, 40), w, words, torch.randn(7), None)
    with pytest.raises(RuntimeError, match=r"grad must be a strided \(3, 8\)"):
        cpp_ops.masked_linear_backward(torch.randn(2, 8), torch.randn(3, 40), w, words, True, True, None)
    with pytest.raises(RuntimeError, match=r"mask_words\[0\] does not fit weight"):
        cpp_ops.masked_linear_forward(torch.randn(3, 40), w, torch.zeros(8, 1, dtype=torch.int32), None, None)


def test_wrappers_refuse_written_tensors_with_shared_elements(cpu_backend):
    p, g = torch.randn(200, 64), torch.randn(200, 64)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] has elements that share memory"):
        dk.masked_sgd_([p], [g], [torch.zeros(1, 64).expand(200, 64)], None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has elements that share memory"):
        dk.masked_adamw_([p], [g], [torch.zeros(1, 64).expand(200, 64)], [torch.zeros_like(p)], None,
                         [torch.tensor(0.0)], None, lr=0.1)
    with pytest.raises(ValueError, match=r"tensors\[0\] has elements that share memory"):
        dk.apply_masks_([torch.zeros(1, 64).expand(200, 64)], [torch.ones(200, 64, dtype=torch.bool)])


def test_wrappers_still_take_transposed_state(cpu_backend):
    """What the wrappers can lay out (a transposed buffer) they step exactly as torch does."""
    torch.manual_seed(0)
    p = torch.randn(4, 6, requires_grad=True)
    p.grad = torch.randn(4, 6)
    ref = torch.nn.Parameter(p.detach().clone())
    ref.grad = p.grad.clone()
    b = torch.randn(6, 4).t()
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    ref_opt.state[ref]["momentum_buffer"] = b.clone()
    ref_opt.step()
    with torch.no_grad():
        dk.masked_sgd_([p], [p.grad], [b], None, lr=0.1, momentum=0.9)
    assert torch.equal(p.detach(), ref.detach()) and torch.equal(b, ref_opt.state[ref]["momentum_buffer"])
