"""The public fused ops, registered as torch.library custom ops `dsd_kernels::*`.

This is the one place that chooses a backend (see _backend.py); everything above it
(optim/, nn/, dsd/) calls these functions, never a kernel. Each op validates its
arguments here, so every backend sees well-formed input.
"""
# No `from __future__ import annotations` here: torch.library.custom_op reads the prototypes'
# annotations to build the schemas, and torch 2.4 accepts only evaluated typing forms.
import math
import numbers
from collections.abc import Iterable, Sequence
from functools import reduce
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _backend
from ._floatbits import KEY_SPECS
from .masks import Mask, as_mask, mask_rows_cols, packed_shape, permuted_mask, real_view_mask

__all__ = ["magnitude_thresholds", "magnitude_masks", "masked_sgd_", "masked_adamw_", "masked_linear"]


# ---------------------------------------------------------------- argument checks
def _as_tensor_list(tensors, name: str = "tensors") -> list[Tensor]:
    """A tensor or any iterable of tensors (a list, model.parameters(), ...) as a list."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable) or isinstance(tensors, (str, bytes, dict)):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return out


def _check_float_same_device(tensors: list[Tensor], name: str = "tensors") -> None:
    for i, t in enumerate(tensors):
        if t.dtype not in KEY_SPECS:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; magnitude selection needs a "
                            f"floating tensor (float16, bfloat16, float32 or float64)")
        if t.device != tensors[0].device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on "
                             f"{tensors[0].device}; all tensors must share one device")


def as_sparsity(value, name: str = "sparsity", *, allow_one: bool = True) -> float:
    """One sparsity as a float: a Python or NumPy real, or a 0-d tensor, in [0, 1]
    ([0, 1) with allow_one=False); anything else is a TypeError/ValueError naming `name`."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_complex \
            and value.dtype != torch.bool:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, {'1]' if allow_one else '1)'}, got {value}")
    return value


def sparsity_list(sparsity, count: int) -> list[float]:
    """One float for every tensor from one sparsity or one per tensor (any iterable)."""
    if isinstance(sparsity, Tensor) and sparsity.dim() == 1:
        sparsity = sparsity.tolist()
    if isinstance(sparsity, Iterable) and not isinstance(sparsity, (str, bytes, Tensor)):
        values = list(sparsity)
        if len(values) != count:
            raise ValueError(f"sparsity has {len(values)} values but there are {count} tensors; "
                             f"give one float or one per tensor")
        return [as_sparsity(s, f"sparsity[{i}]") for i, s in enumerate(values)]
    return [as_sparsity(sparsity)] * count


def _any_dtensor(tensors: list[Tensor]) -> bool:
    """DTensors (sharded weights) take the collective path of distributed.py; all or none."""
    if not torch.distributed.is_available():
        return False
    from .distributed import is_dtensor
    flags = [is_dtensor(t) for t in tensors]
    if any(flags) and not all(flags):
        raise ValueError("tensors mixes DTensors and plain tensors; pass them in separate calls")
    return any(flags)


def _threshold_dtype(tensors: list[Tensor]) -> torch.dtype:
    # every threshold is exact in the promoted dtype (fp16 and bf16 promote to fp32)
    return reduce(torch.promote_types, (t.dtype for t in tensors), tensors[0].dtype)


def _dtypes(tensors) -> tuple[torch.dtype, ...]:
    return tuple(dict.fromkeys(t.dtype for t in tensors))


# ---------------------------------------------------------------- magnitude selection
def _check_select_args(tensors: list[Tensor], sparsities: list[float]) -> None:
    """The checks of the selection ops' real and fake implementations (direct torch.ops calls)."""
    torch._check_value(len(tensors) == len(sparsities),
                       lambda: f"magnitude selection: {len(tensors)} tensors but {len(sparsities)} sparsities")
    for i, (t, s) in enumerate(zip(tensors, sparsities)):
        torch._check_type(t.dtype in KEY_SPECS,
                          lambda: f"tensors[{i}] has dtype {t.dtype}; magnitude selection needs a "
                                  f"floating tensor (float16, bfloat16, float32 or float64)")
        torch._check_value(t.device == tensors[0].device,
                           lambda: f"tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}")
        torch._check_value(0.0 <= s <= 1.0, lambda: f"sparsities[{i}] must be in [0, 1], got {s}")


def _select(tensors: list[Tensor], sparsities: list[float], want_masks: bool):
    _check_select_args(tensors, sparsities)
    if not tensors:
        return torch.empty(0, dtype=torch.float64), []
    impl = _backend.implementation("magnitude_select", tensors[0].device, _dtypes(tensors))
    return impl.magnitude_select(tensors, sparsities, want_masks=want_masks,
                                 out_dtype=_threshold_dtype(tensors))


@torch.library.custom_op("dsd_kernels::magnitude_thresholds", mutates_args=())
def _magnitude_thresholds_op(tensors: List[Tensor], sparsities: List[float]) -> Tensor:
    return _select(tensors, sparsities, want_masks=False)[0]


@_magnitude_thresholds_op.register_fake
def _(tensors, sparsities):
    _check_select_args(tensors, sparsities)
    torch._check_value(len(tensors) > 0, lambda: "magnitude_thresholds: tensors is empty")
    return tensors[0].new_empty((len(tensors),), dtype=_threshold_dtype(tensors))


@torch.library.custom_op("dsd_kernels::magnitude_masks", mutates_args=())
def _magnitude_masks_op(tensors: List[Tensor], sparsities: List[float]) -> List[Tensor]:
    """The packed int32 keep-words of every tensor (see masks.py for the layout)."""
    return _select(tensors, sparsities, want_masks=True)[1]


@_magnitude_masks_op.register_fake
def _(tensors, sparsities):
    _check_select_args(tensors, sparsities)
    return [t.new_empty(packed_shape(t.shape), dtype=torch.int32) for t in tensors]


def _sharded_select(tensors: list[Tensor], sparsities: list[float], want_masks: bool):
    """Thresholds and local masks of DTensors, with the backend the registry picks for the
    device of their local shards (distributed.py runs the collectives around its kernels)."""
    from . import distributed
    local_device = distributed.local_tensor(tensors[0]).device
    return distributed.sharded_select(
        tensors, sparsities, want_masks=want_masks,
        local=_backend.implementation("magnitude_select", local_device, _dtypes(tensors)),
        sharded=_backend.implementation("magnitude_select_sharded", local_device, _dtypes(tensors)))


def magnitude_thresholds(tensors, sparsity) -> Tensor:
    """Exact per-tensor magnitude thresholds: the k-th smallest |w|, k = round(s * numel).

    tensors: a float tensor or an iterable of them (one device; any shapes and float dtypes).
    sparsity: one float in [0, 1] for all tensors, or one per tensor.
    Returns a 1-D tensor with one threshold per tensor (-inf where k == 0), in the
    promoted dtype of the inputs, on their device. NaN ranks above +inf; -0.0 == 0.0.
    """
    tensors = _as_tensor_list(tensors)
    sparsities = sparsity_list(sparsity, len(tensors))
    if not tensors:
        return torch.empty(0)
    _check_float_same_device(tensors)
    if _any_dtensor(tensors):
        found, _ = _sharded_select(tensors, sparsities, want_masks=False)
        return found.to(_threshold_dtype(tensors))
    return torch.ops.dsd_kernels.magnitude_thresholds([t.detach() for t in tensors], sparsities)


def _check_block(block) -> tuple[int, int] | None:
    if block is None:
        return None
    if (not isinstance(block, Sequence) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block must be None or two positive ints (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


def _tile_l1(t: Tensor, bh: int, bw: int) -> Tensor:
    """L1 norm of every (bh x bw) tile of t viewed as (rows, cols); edge tiles are partial."""
    rows, cols = mask_rows_cols(t.shape)
    tiles_r, tiles_c = -(-rows // bh), -(-cols // bw)
    padded = torch.zeros(tiles_r * bh, tiles_c * bw, dtype=torch.float64, device=t.device)
    padded[:rows, :cols] = t.detach().reshape(rows, cols).abs()
    return padded.view(tiles_r, bh, tiles_c, bw).sum((1, 3))


def magnitude_masks(tensors, sparsity, block=None) -> list[Mask]:
    """Exact magnitude masks: per tensor, the k = round(s * numel) smallest |w| are pruned.

    tensors: a float tensor or an iterable of them (one device). Ties in |w| are pruned
    lowest flat index first, so exactly k weights are pruned whatever the values
    (all-equal weights included). Returns one packed Mask per tensor.

    block=(bh, bw): prune whole tiles of each tensor (viewed as (shape[0], numel/shape[0]))
    instead, ranked by their L1 norm (summed in fp64), exactly round(s * tiles) tiles per
    tensor with the same tie rules over tiles in row-major order. Edge tiles may be
    partial, so the pruned fraction of weights can differ slightly from s. Use the
    matmul's tile (64, 64) to turn sparsity into speed in masked_linear.
    """
    tensors = _as_tensor_list(tensors)
    sparsities = sparsity_list(sparsity, len(tensors))
    block = _check_block(block)
    if not tensors:
        return []
    _check_float_same_device(tensors)
    if block is not None:
        if _any_dtensor(tensors):
            raise NotImplementedError("block pruning of DTensors is not supported yet")
        bh, bw = block
        scores = [_tile_l1(t, bh, bw) for t in tensors]
        tile_masks = magnitude_masks(scores, sparsities)
        masks = []
        for t, tm in zip(tensors, tile_masks):
            rows, cols = mask_rows_cols(t.shape)
            keep = tm.to_bool().repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
            masks.append(Mask.from_bool(keep.reshape(t.shape)))
        return masks
    if _any_dtensor(tensors):
        return _sharded_select(tensors, sparsities, want_masks=True)[1]
    words = torch.ops.dsd_kernels.magnitude_masks([t.detach() for t in tensors], sparsities)
    return [Mask(w, t.shape) for w, t in zip(words, tensors)]


# ---------------------------------------------------------------- masked SGD
def check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """The checks (and messages) of torch.optim.SGD's constructor."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _check_sgd_args(params, grads, momentum_buffers, mask_words, first_step, momentum) -> None:
    """The checks of the masked_sgd_ op's real and fake implementations."""
    torch._check_value(len(params) == len(grads) == len(mask_words),
                       lambda: f"masked_sgd_: params, grads and mask_words have lengths "
                               f"{len(params)}, {len(grads)}, {len(mask_words)}")
    want = len(params) if momentum != 0 else 0
    torch._check_value(len(momentum_buffers) == len(first_step) == want,
                       lambda: f"masked_sgd_: momentum_buffers and first_step need {want} entries "
                               f"(momentum={momentum}), got {len(momentum_buffers)}, {len(first_step)}")
    for i, p in enumerate(params):
        for ok, error, message in _sgd_tensor_checks(i, p, grads[i], momentum_buffers[i] if want else None,
                                                     mask_words[i], params[0].device):
            if not ok:  # plain tests first: torch._check per tensor would cost a step's 15%
                (torch._check_type if error is TypeError else torch._check_value)(False, message)


def _sgd_tensor_checks(i, p, g, b, words, device):
    """(holds, error type, message) of every check on parameter i's tensors."""
    yield p.dtype in KEY_SPECS, TypeError, lambda: f"params[{i}] has dtype {p.dtype}; SGD needs floating parameters"
    yield (g.shape == p.shape and g.dtype == p.dtype and g.device == p.device, ValueError,
           lambda: f"grads[{i}] ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match params[{i}] "
                   f"({tuple(p.shape)}, {p.dtype}, {p.device})")
    yield p.device == device, ValueError, lambda: f"params[{i}] is on {p.device} but params[0] is on {device}"
    if b is not None:
        yield (b.shape == p.shape and b.dtype == p.dtype and b.device == p.device, ValueError,
               lambda: f"momentum_buffers[{i}] does not match params[{i}] in shape, dtype or device")
    if words is not None:
        yield (words.dtype == torch.int32 and tuple(words.shape) == packed_shape(p.shape)
               and words.device == p.device, ValueError,
               lambda: f"mask_words[{i}] ({tuple(words.shape)}, {words.dtype}) does not fit params[{i}]: "
                       f"expected int32 {packed_shape(p.shape)} on {p.device}")


@torch.library.custom_op("dsd_kernels::masked_sgd_", mutates_args=("params", "momentum_buffers"))
def _masked_sgd_op(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                   mask_words: List[Optional[Tensor]], first_step: List[bool], lr: float,
                   momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                   maximize: bool, torch_fused: bool = False) -> None:
    _check_sgd_args(params, grads, momentum_buffers, mask_words, first_step, momentum)
    if not params:
        return
    impl = _backend.implementation("masked_sgd", params[0].device, _dtypes(params),
                                   "fused" if torch_fused else "foreach")
    impl.masked_sgd_(params, grads, momentum_buffers, mask_words, first_step, lr=lr,
                     momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                     nesterov=nesterov, maximize=maximize, torch_fused=torch_fused)


@_masked_sgd_op.register_fake
def _(params, grads, momentum_buffers, mask_words, first_step, lr, momentum, dampening,
      weight_decay, nesterov, maximize, torch_fused=False):
    _check_sgd_args(params, grads, momentum_buffers, mask_words, first_step, momentum)
    return None


def _storage_order(t: Tensor) -> tuple[int, ...] | None:
    """The dims of a non-overlapping, dense tensor from the slowest- to the fastest-moving in
    memory (channels_last (N, C, H, W) -> (0, 2, 3, 1)), so that t.permute(dims) is contiguous;
    None where no permutation is (a strided slice with gaps)."""
    dims = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    return dims if t.permute(dims).is_contiguous() else None


def _kernel_layout(t: Tensor, mask: Mask | None, companions, write_back: list, read_only: int = 0):
    """`t` as the kernels take it, a contiguous real tensor, with its mask and companion tensors
    of t's shape (gradients, buffers; None allowed) transformed alike: a complex tensor as its
    real view (the mask covering both parts), a dense non-contiguous one (channels_last) as its
    storage-order view (no copy; the mask permuted, cached), anything else as a contiguous copy
    registered in write_back as (original, copy) to be copied back after the kernel ran; the
    first `read_only` companions are only read, so their copies are not written back.
    Returns (t, mask, companions)."""
    companions = list(companions)
    if t.is_complex():
        t = torch.view_as_real(t)
        companions = [None if c is None else torch.view_as_real(c) for c in companions]
        mask = None if mask is None else real_view_mask(mask)
    if not t.is_contiguous():
        dims = _storage_order(t)
        if dims is not None:
            t = t.permute(dims)
            companions = [None if c is None else c.permute(dims) for c in companions]
            mask = None if mask is None else permuted_mask(mask, dims)
        else:
            write_back.append((t, t.contiguous()))
            t = write_back[-1][1]
    for i, c in enumerate(companions):
        if c is not None and not c.is_contiguous():  # e.g. a buffer in another memory order
            companions[i] = c.contiguous()
            if i >= read_only:
                write_back.append((c, companions[i]))
    return t, mask, companions


def masked_sgd_(params, grads, momentum_buffers, masks, *, lr, momentum=0.0, dampening=0.0,
                weight_decay=0.0, nesterov=False, maximize=False, torch_fused=False) -> None:
    """One fused masked SGD step over a list of parameters, in place.

    torch.optim.SGD's arithmetic exactly (grad -> maximize -> weight decay -> momentum ->
    nesterov -> update, each as torch computes it: fp32/fp64 results are bit-identical on CPU
    to torch.optim.SGD's single-tensor and foreach steps, or with torch_fused=True to its fused
    kernel) on the masked gradient; pruned weights and their momentum are set to exactly 0. params, grads: tensors or iterables of them. masks: None (all dense), or
    one per parameter: a Mask, a bool or 0/1 float tensor (True/1 = kept; over the
    parameter's logical shape, whatever its memory order), or None (dense).
    momentum_buffers: None, or one per parameter: a tensor, or None to create it on this
    step (as torch does: the first buffer is the gradient itself, in the parameter's memory
    format); created buffers are written into the list. All tensors of a parameter on one
    device; parameters may be non-contiguous (channels_last steps in its memory order, with
    no copy), complex (stepped through their real view; a mask covers each complex element)
    or have sparse gradients (densified for the step).
    """
    params = _as_tensor_list(params, "params")
    grads = _as_tensor_list(grads, "grads")
    masks = [None] * len(params) if masks is None else list(masks)
    momentum_buffers = momentum_buffers if momentum_buffers is not None else [None] * len(params)
    if not len(params) == len(grads) == len(masks) == len(momentum_buffers):
        raise ValueError(f"params, grads, momentum_buffers and masks must have equal lengths, got "
                         f"{len(params)}, {len(grads)}, {len(momentum_buffers)}, {len(masks)}")
    check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    if not params:
        return
    fresh: set[int] = set()  # buffers created here: their first step copies the gradient
    if _any_dtensor(params):
        # sharded params (FSDP2): step each rank's local shard in place with its local mask;
        # new momentum buffers are DTensors like their params, so checkpoints stay sharded
        from .distributed import local_tensor
        for i, p in enumerate(params):
            if momentum != 0 and momentum_buffers[i] is None:
                momentum_buffers[i] = torch.zeros_like(p)
                fresh.add(i)
        params = [local_tensor(p) for p in params]
        grads = [local_tensor(g) for g in grads]
        momentum_buffers = [None if b is None else local_tensor(b) for b in momentum_buffers]
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} and dtype {g.dtype} but "
                             f"params[{i}] has {tuple(p.shape)} and {p.dtype}")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"params[{i}] has dtype {p.dtype}; SGD needs floating or complex parameters")
        if g.device != p.device:
            raise ValueError(f"grads[{i}] is on {g.device} but params[{i}] is on {p.device}")
    # per device (the kernels take one device per call), each parameter as a contiguous
    # real tensor: its storage-order view where it has one, a copy written back otherwise
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    for device, index in by_device.items():
        steps, write_back, first, words = [], [], [], []
        for i in index:
            p, g, buf = params[i].detach(), grads[i], momentum_buffers[i]
            mask = None if masks[i] is None else as_mask(masks[i], p, f"masks[{i}]")
            if g.layout != torch.strided:
                g = g.coalesce().to_dense() if g.is_sparse else g.to_dense()
            if momentum != 0:
                if buf is None:
                    buf = momentum_buffers[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    first.append(True)
                else:
                    if buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                        raise ValueError(f"momentum_buffers[{i}] does not match params[{i}] in "
                                         f"shape, dtype or device")
                    first.append(i in fresh)
                buf = buf.detach()
            p, mask, (g, buf) = _kernel_layout(p, mask, (g, buf), write_back, read_only=1)
            steps.append((p, g, buf))
            words.append(None if mask is None else mask.packed)
        torch.ops.dsd_kernels.masked_sgd_([p for p, _, _ in steps], [g for _, g, _ in steps],
                                          [b for _, _, b in steps if b is not None], words, first,
                                          float(lr), float(momentum), float(dampening),
                                          float(weight_decay), bool(nesterov), bool(maximize),
                                          bool(torch_fused))
        for target, stepped in write_back:
            target.copy_(stepped)


def _check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words,
                      amsgrad) -> None:
    """The checks of the masked_adamw_ op's real and fake implementations."""
    n = len(params)
    torch._check_value(len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == len(mask_words) == n,
                       lambda: f"masked_adamw_: params, grads, exp_avgs, exp_avg_sqs, state_steps and "
                               f"mask_words need {n} entries each")
    torch._check_value(len(max_exp_avg_sqs) == (n if amsgrad else len(max_exp_avg_sqs)),
                       lambda: f"masked_adamw_: amsgrad needs {n} max_exp_avg_sqs, got {len(max_exp_avg_sqs)}")
    # one pass of plain comparisons first (an optimizer step checks every parameter, every step);
    # the detailed loop below runs only to name what is wrong
    state_lists = (grads, exp_avgs, exp_avg_sqs) + ((max_exp_avg_sqs,) if amsgrad else ())
    if all(p.dtype in KEY_SPECS
           and all(t.shape == p.shape and t.dtype == p.dtype and t.device == p.device
                   for t in (s[i] for s in state_lists))
           and (w is None or (w.dtype == torch.int32 and tuple(w.shape) == packed_shape(p.shape)))
           for i, (p, w) in enumerate(zip(params, mask_words))):
        return
    for i, p in enumerate(params):
        torch._check_type(p.dtype in KEY_SPECS, lambda: f"params[{i}] has dtype {p.dtype}; AdamW needs "
                                                        f"floating parameters")
        state = [("grads", grads[i]), ("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])]
        if amsgrad:
            state.append(("max_exp_avg_sqs", max_exp_avg_sqs[i]))
        for name, t in state:
            if not (t.shape == p.shape and t.dtype == p.dtype and t.device == p.device):
                torch._check_value(False, lambda: f"{name}[{i}] ({tuple(t.shape)}, {t.dtype}, {t.device}) "
                                                  f"does not match params[{i}] ({tuple(p.shape)}, {p.dtype}, "
                                                  f"{p.device})")
        words = mask_words[i]
        if words is not None and not (words.dtype == torch.int32 and tuple(words.shape) == packed_shape(p.shape)):
            torch._check_value(False, lambda: f"mask_words[{i}] ({tuple(words.shape)}, {words.dtype}) does not "
                                              f"fit params[{i}]: expected int32 {packed_shape(p.shape)}")


@torch.library.custom_op("dsd_kernels::masked_adamw_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))
def _masked_adamw_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                     exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor],
                     mask_words: List[Optional[Tensor]], lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float, amsgrad: bool, maximize: bool, torch_fused: bool = False) -> None:
    _check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, amsgrad)
    if not params:
        return
    impl = _backend.implementation("masked_adamw", params[0].device, _dtypes(params),
                                   "fused" if torch_fused else "foreach")
    impl.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words,
                       lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, maximize=maximize, torch_fused=torch_fused)


@_masked_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, torch_fused=False):
    _check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, amsgrad)
    return None


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, *, lr,
                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
                  torch_fused=False) -> None:
    """One fused masked AdamW step over a list of parameters, in place (names as torch's
    functional `adamw`).

    torch.optim.AdamW's arithmetic exactly: fp32/fp64 results are bit-identical on CPU to
    torch.optim.AdamW's single-tensor and foreach steps (with torch_fused=True, to its fused
    kernel) on the kept weights; the pruned weights, exp_avg, exp_avg_sq (and max_exp_avg_sq)
    are exactly +0 after the step, whatever the gradient held there. state_steps: one scalar
    tensor per parameter (as torch keeps them), incremented here. masks: None (all dense), or
    one per parameter: a Mask, a bool or 0/1 tensor (True/1 = kept), or None (dense).
    Parameters may be non-contiguous (channels_last steps in its memory order) or complex
    (stepped through the real view). On CPU the C++ kernel does it in one pass over memory.
    """
    params = _as_tensor_list(params, "params")
    grads = _as_tensor_list(grads, "grads")
    exp_avgs, exp_avg_sqs = list(exp_avgs), list(exp_avg_sqs)
    max_exp_avg_sqs = list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else []
    state_steps = list(state_steps)
    masks = [None] * len(params) if masks is None else list(masks)
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == len(masks) == n):
        raise ValueError(f"params, grads, exp_avgs, exp_avg_sqs, state_steps and masks must have equal "
                         f"lengths, got {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, "
                         f"{len(state_steps)}, {len(masks)}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(f"amsgrad=True needs {n} max_exp_avg_sqs, got {len(max_exp_avg_sqs)}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, Tensor) or not value >= 0.0:
            raise ValueError(f"Invalid {name} value: {value} (a non-negative float)")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, Tensor) or not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid {name} value: {value} (a float in [0, 1))")
    if not params:
        return
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"params[{i}] has dtype {p.dtype}; AdamW needs floating or complex parameters")
        by_device.setdefault(p.device, []).append(i)
    for device, index in by_device.items():
        stepped, write_back, words = [], [], []
        for i in index:
            p = params[i].detach()
            mask = None if masks[i] is None else as_mask(masks[i], p, f"masks[{i}]")
            g = grads[i]
            if g.layout != torch.strided:
                raise ValueError(f"grads[{i}]: AdamW does not support sparse gradients")
            state = [exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else [])
            p, mask, (g, *state) = _kernel_layout(p, mask, [g] + [t.detach() for t in state], write_back,
                                                   read_only=1)
            stepped.append((p, g, state))
            words.append(None if mask is None else mask.packed)
        torch.ops.dsd_kernels.masked_adamw_(
            [p for p, _, _ in stepped], [g for _, g, _ in stepped], [s[0] for _, _, s in stepped],
            [s[1] for _, _, s in stepped], [s[2] for _, _, s in stepped] if amsgrad else [],
            [state_steps[i] for i in index], words, float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(amsgrad), bool(maximize), bool(torch_fused))
        for target, result in write_back:
            target.copy_(result)


def masked_adamw_reference_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, *,
                            lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                            maximize=False) -> None:
    """masked_adamw_ by the per-tensor reference (reference/masked_adamw.py); slow, obviously right."""
    from .reference import masked_adamw_ as reference_adamw
    params = _as_tensor_list(params, "params")
    keeps = [None if m is None else as_mask(m, p, f"masks[{i}]").to_bool().to(p.device)
             for i, (m, p) in enumerate(zip(masks if masks is not None else [None] * len(params), params))]
    reference_adamw(params, list(grads), list(exp_avgs), list(exp_avg_sqs),
                    list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [], list(state_steps), keeps,
                    lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    maximize=maximize)


def masked_sgd_reference_(params, grads, momentum_buffers, masks, *, lr, momentum=0.0,
                          dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False) -> None:
    """masked_sgd_ by the per-tensor reference (reference/masked_sgd.py: torch.optim.SGD's
    `_single_tensor_sgd` arithmetic on masked gradients), same arguments; slow, obviously right."""
    from .reference import masked_sgd_ as reference_sgd
    params = _as_tensor_list(params, "params")
    grads = _as_tensor_list(grads, "grads")
    masks = [None] * len(params) if masks is None else list(masks)
    check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    keeps = [None if m is None else as_mask(m, p, f"masks[{i}]").to_bool()
             for i, (m, p) in enumerate(zip(masks, params))]
    grads = [g.coalesce().to_dense() if g.is_sparse else g for g in grads]
    # in place on the parameters: traced by autograd when grad mode is on (differentiable SGD)
    reference_sgd(params, grads, momentum_buffers, keeps, lr=lr, momentum=momentum,
                  dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)


# ---------------------------------------------------------------- re-masking
def _check_apply_masks_args(tensors: list[Tensor], mask_words: list[Tensor]) -> None:
    """The checks of the apply_masks_ op's real and fake implementations."""
    torch._check_value(len(tensors) == len(mask_words),
                       lambda: f"apply_masks_: {len(tensors)} tensors but {len(mask_words)} masks")
    for i, (t, w) in enumerate(zip(tensors, mask_words)):
        if not (w.dtype == torch.int32 and tuple(w.shape) == packed_shape(t.shape)
                and w.device == t.device and t.dtype in KEY_SPECS):  # plain test first: see _check_sgd_args
            torch._check_value(False, lambda: f"mask_words[{i}] does not fit tensors[{i}] "
                                              f"({tuple(t.shape)}, {t.dtype})")


@torch.library.custom_op("dsd_kernels::apply_masks_", mutates_args=("tensors",))
def _apply_masks_op(tensors: List[Tensor], mask_words: List[Tensor]) -> None:
    _check_apply_masks_args(tensors, mask_words)
    if tensors:
        impl = _backend.implementation("apply_masks", tensors[0].device, _dtypes(tensors))
        impl.apply_masks_(tensors, mask_words)


@_apply_masks_op.register_fake
def _(tensors, mask_words):
    _check_apply_masks_args(tensors, mask_words)
    return None


def apply_masks_(tensors, masks) -> None:
    """Zero the pruned entries of every tensor in place (exactly +0, NaN and inf included): one
    fused pass per device and dtype over all of them. tensors: tensors or an iterable of them
    (any layout: channels_last in memory order, complex through the real view); masks: one
    per tensor, a Mask, a bool or 0/1 float tensor (True/1 = kept), or None (left as is)."""
    tensors = _as_tensor_list(tensors)
    masks = list(masks)
    if len(masks) != len(tensors):
        raise ValueError(f"apply_masks_: {len(tensors)} tensors but {len(masks)} masks")
    by_device: dict[torch.device, list[int]] = {}
    for i, (t, m) in enumerate(zip(tensors, masks)):
        if m is not None:
            if not (t.is_floating_point() or t.is_complex()):
                raise TypeError(f"tensors[{i}] has dtype {t.dtype}; masks apply to floating tensors")
            by_device.setdefault(t.device, []).append(i)
    for index in by_device.values():
        write_back, views, words = [], [], []
        for i in index:
            view, mask, _ = _kernel_layout(tensors[i].detach(), as_mask(masks[i], tensors[i], f"masks[{i}]"),
                                           (), write_back)
            views.append(view)
            words.append(mask.packed)
        torch.ops.dsd_kernels.apply_masks_(views, words)
        for target, done in write_back:
            target.copy_(done)


# ---------------------------------------------------------------- masked linear
def _check_linear_args(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor]) -> None:
    """The checks of the masked_linear ops' real and fake implementations."""
    torch._check_value(weight.dim() == 2, lambda: f"weight must be 2-D (out_features, in_features), "
                                                  f"got shape {tuple(weight.shape)}")
    torch._check_value(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                       lambda: f"x has {x.shape[-1] if x.dim() else 0} features in its last dim but "
                               f"weight expects in_features={weight.shape[1]}")
    torch._check_type(x.dtype == weight.dtype and x.dtype in KEY_SPECS,
                      lambda: f"x is {x.dtype} and weight is {weight.dtype}; they must be one float dtype")
    torch._check_value(x.device == weight.device, lambda: f"x is on {x.device} but weight is on {weight.device}")
    torch._check_value(mask_words.dtype == torch.int32 and tuple(mask_words.shape) == packed_shape(weight.shape)
                       and mask_words.device == weight.device,
                       lambda: f"mask_words ({tuple(mask_words.shape)}, {mask_words.dtype}, "
                               f"{mask_words.device}) does not fit weight {tuple(weight.shape)}: "
                               f"expected int32 {packed_shape(weight.shape)} on {weight.device}")
    if bias is not None:
        torch._check_value(bias.shape == (weight.shape[0],) and bias.dtype == weight.dtype
                           and bias.device == weight.device,
                           lambda: f"bias must be a {weight.dtype} tensor of shape ({weight.shape[0]},) "
                                   f"on {weight.device}, got {tuple(bias.shape)} {bias.dtype} {bias.device}")


def _as_rows(t: Tensor) -> Tensor:
    """(..., features) as a contiguous (rows, features) matrix; zero rows or features included."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]).contiguous()


def _linear_impl(x2d: Tensor):
    return _backend.implementation("masked_linear", x2d.device, (x2d.dtype,))


@torch.library.custom_op("dsd_kernels::masked_linear", mutates_args=())
def _masked_linear_op(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check_linear_args(x, weight, mask_words, bias)
    x2d = _as_rows(x)
    if x2d.numel() == 0:  # no input rows or in_features == 0: y is the bias (or 0), as F.linear gives
        y = x2d.new_zeros((x2d.shape[0], weight.shape[0]))
        if bias is not None:
            y += bias
    else:
        y = _linear_impl(x2d).forward(x2d, weight.contiguous(), mask_words.contiguous(), bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@_masked_linear_op.register_fake
def _(x, weight, mask_words, bias):
    _check_linear_args(x, weight, mask_words, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("dsd_kernels::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, mask_words: Tensor,
                               needs_input: bool, needs_weight: bool, needs_bias: bool
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dX like x, dW like weight, db (out,)); an unneeded gradient comes back empty."""
    _check_linear_args(x, weight, mask_words, None)
    g2d = _as_rows(grad)
    x2d = _as_rows(x)
    if x2d.numel() == 0:  # nothing to multiply: dX is empty or 0, dW is 0
        dx = torch.zeros_like(x2d) if needs_input else None
        dw = torch.zeros_like(weight) if needs_weight else None
    else:
        dx, dw = _linear_impl(x2d).backward(g2d, x2d, weight.contiguous(), mask_words.contiguous(),
                                            needs_input, needs_weight)
    dx = dx.reshape(x.shape) if dx is not None else x.new_empty(0)
    dw = dw if dw is not None else weight.new_empty(0)
    db = g2d.sum(0) if needs_bias else weight.new_empty(0)
    return dx, dw, db


@_masked_linear_backward_op.register_fake
def _(grad, x, weight, mask_words, needs_input, needs_weight, needs_bias):
    _check_linear_args(x, weight, mask_words, None)
    return (x.new_empty(x.shape if needs_input else (0,)),
            weight.new_empty(weight.shape if needs_weight else (0,)),
            weight.new_empty((weight.shape[0],) if needs_bias else (0,)))


def _masked_linear_setup_context(ctx, inputs, output):
    x, weight, mask_words, bias = inputs
    ctx.save_for_backward(x, weight, mask_words)
    ctx.has_bias = bias is not None


def _masked_linear_backward(ctx, grad):
    x, weight, mask_words = ctx.saved_tensors
    needs_x, needs_w, _, needs_b = ctx.needs_input_grad
    dx, dw, db = torch.ops.dsd_kernels.masked_linear_backward(
        grad, x, weight, mask_words, needs_x, needs_w, bool(ctx.has_bias and needs_b))
    return (dx if needs_x else None, dw if needs_w else None, None,
            db if ctx.has_bias and needs_b else None)


torch.library.register_autograd("dsd_kernels::masked_linear", _masked_linear_backward,
                                setup_context=_masked_linear_setup_context)


def mask_words_for_weight(mask, weight: Tensor, name: str = "mask") -> Tensor:
    """Packed int32 words for `weight` from a Mask, a bool or 0/1 float tensor, or packed words."""
    if isinstance(mask, Tensor) and mask.dtype == torch.int32:
        if tuple(mask.shape) != packed_shape(weight.shape):
            raise ValueError(f"{name} (packed words) has shape {tuple(mask.shape)}, expected "
                             f"{packed_shape(weight.shape)} for a weight of shape {tuple(weight.shape)}")
        words = mask
    else:
        if mask is None:
            raise TypeError(f"{name} must be a Mask, a bool tensor or packed int32 words, got None")
        words = as_mask(mask, weight, name).packed
    if words.device != weight.device:
        raise ValueError(f"{name} is on {words.device} but weight is on {weight.device}")
    return words


def masked_linear(x: Tensor, weight: Tensor, mask, bias: Tensor | None = None) -> Tensor:
    """y = x @ (W*M)^T + b without materialising W*M on GPU; differentiable in x, W and b.

    x: (..., in_features); weight: (out_features, in_features); mask: a Mask, a bool or 0/1
    float tensor of weight's shape (True/1 = kept), or its packed int32 words; bias: (out,)
    or None. Backward: dX = dY @ (W*M), dW = (dY^T @ X) * M (exactly 0 where pruned), db = sum dY.
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features in its last dim but "
                         f"weight expects in_features={weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}; they must match")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device} but weight is {weight.dtype} "
                            f"on {weight.device}")
    words = mask_words_for_weight(mask, weight)
    return torch.ops.dsd_kernels.masked_linear(x, weight, words, bias)
