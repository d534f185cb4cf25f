"""Fuzzing of every dsd_kernels op and public wrapper, as a script run in a subprocess by
tests/test_fuzz_ops.py (a crash then fails that test instead of killing the suite).

    python -m tests._helpers.fuzz_ops --examples N [--backends cpp,triton] [--seed S]

Hypothesis draws calls with random shapes (0-size included), layouts (transposed, expanded,
gapped slices, storage offsets, channels_last), dtypes, devices (cpu, meta), list lengths and
None entries. Every call must either raise ValueError/TypeError/RuntimeError whose message names
one of the call's arguments, or give the same bits (outputs and every tensor it writes) as the
"torch" backend given the same inputs (masked_linear: the same values to the dtype's tolerance,
since a matmul's sum order is the backend's). Prints one JSON line of counts; exits 1 on the first
call that does neither (printing it)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

import dsd_kernels as dk
from dsd_kernels.masks import packed_shape

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "transposed", "expanded", "gapped", "offset", "channels_last")
COUNTS: dict[str, int] = {"calls": 0, "raised": 0, "same_bits": 0, "meta": 0}

# the argument names a message may name, per call (the wrappers' names and the ops' schemas)
ARGUMENTS = {
    "magnitude_thresholds": ("tensors", "sparsities", "sparsity"),
    "magnitude_masks": ("tensors", "sparsities", "sparsity", "block"),
    "masked_sgd_": ("params", "grads", "momentum_buffers", "mask_words", "masks", "first_step", "lr", "momentum",
                    "dampening", "weight_decay", "Nesterov", "SGD"),
    "masked_adamw_": ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "mask_words",
                      "masks", "lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "AdamW"),
    "apply_masks_": ("tensors", "mask_words", "masks"),
    "masked_linear": ("x", "weight", "mask_words", "mask", "bias", "in_features"),
    "masked_linear_backward": ("grad", "x", "weight", "mask_words", "in_features"),
}


class Finding(AssertionError):
    """A call that neither raised a clear error nor matched the reference."""


# ---------------------------------------------------------------- drawing tensors
@st.composite
def shapes(draw, max_dims=3):
    dims = draw(st.integers(0, max_dims))
    return tuple(draw(st.sampled_from((0, 1, 2, 3, 5, 33, 40))) for _ in range(dims))


def _laid_out(base: torch.Tensor, layout: str) -> torch.Tensor:
    """`base`'s values with the given memory layout (the same logical shape)."""
    if layout == "transposed" and base.dim() >= 2:
        return base.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "expanded" and base.dim() >= 1 and base.numel():
        return base.narrow(0, 0, 1).expand(base.shape)  # elements sharing memory
    if layout == "gapped" and base.dim() >= 1:
        wide = torch.zeros(*base.shape[:-1], base.shape[-1] * 2, dtype=base.dtype, device=base.device)
        wide[..., ::2] = base
        return wide[..., ::2]
    if layout == "offset":
        flat = torch.zeros(base.numel() + 3, dtype=base.dtype, device=base.device)
        out = flat[3:].view(base.shape)
        out.copy_(base)
        return out
    if layout == "channels_last" and base.dim() == 4:
        return base.contiguous(memory_format=torch.channels_last)
    return base.clone()


@st.composite
def tensors_like(draw, shape, dtype, device, bad=0.15):
    """A tensor of shape/dtype (or, with probability `bad`, another shape or dtype), random
    values, any layout."""
    if draw(st.floats(0, 1)) < bad:
        if draw(st.booleans()):
            shape = draw(shapes())
        else:
            dtype = draw(st.sampled_from(FLOATS + (torch.int32, torch.int64, torch.bool)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if dtype.is_floating_point:
        base = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if base.numel() and draw(st.booleans()):  # ties, zeros and signs
            base = base.round()
    elif dtype == torch.bool:
        base = torch.rand(shape, generator=gen) > 0.5
    else:
        base = torch.randint(-9, 9, shape, generator=gen, dtype=dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    t = _laid_out(base, layout)
    note(f"tensor {tuple(t.shape)} {dtype} {layout} strides {t.stride()}")
    return t.to("meta") if device == "meta" else t


@st.composite
def mask_words(draw, shape, device, allow_none=True):
    """Packed keep-words for `shape` (sometimes of a wrong shape or dtype, or None)."""
    choice = draw(st.sampled_from(("fit", "fit", "fit", "none", "wrong_shape", "wrong_dtype")))
    if choice == "none" and allow_none:
        return None
    rows, cols = packed_shape(shape)
    if choice == "wrong_shape":
        rows, cols = rows + 1, cols
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    words = torch.randint(-2**31, 2**31 - 1, (rows, cols), generator=gen, dtype=torch.int64).to(torch.int32)
    if choice == "wrong_dtype":
        words = words.to(torch.int64)
    return words.to("meta") if device == "meta" else words


# ---------------------------------------------------------------- drawing calls
@st.composite
def calls(draw):
    """(name, a function of no arguments that makes the call on fresh copies of the inputs and
    returns every tensor it produced or wrote)."""
    device = draw(st.sampled_from(("cpu", "cpu", "cpu", "meta")))
    kind = draw(st.sampled_from(("magnitude_thresholds", "magnitude_masks", "masked_sgd_", "masked_adamw_",
                                 "apply_masks_", "masked_linear", "masked_linear_backward")))
    direct = draw(st.booleans()) or kind == "masked_linear_backward"
    n = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(FLOATS))
    param_shapes = [draw(shapes()) for _ in range(n)]
    params = [draw(tensors_like(s, dtype, device, bad=0.1)) for s in param_shapes]
    like = lambda i, bad=0.15: draw(tensors_like(tuple(params[i].shape), params[i].dtype, device, bad))  # noqa: E731
    words = [draw(mask_words(tuple(p.shape), device)) for p in params]
    if words and draw(st.integers(0, 9)) == 0:  # a list one short
        words = words[:-1]

    if kind in ("magnitude_thresholds", "magnitude_masks"):
        sparsities = [draw(st.sampled_from((0.0, 0.3, 0.5, 1.0, -0.1, 1.5, float("nan")))) for _ in params]
        if draw(st.integers(0, 9)) == 0:
            sparsities = sparsities[:-1]
        if direct:
            op = getattr(torch.ops.dsd_kernels, kind)
            return kind, device, lambda c: op(c(params), sparsities)
        fn = getattr(dk, kind)
        sparsity = sparsities if draw(st.booleans()) else (sparsities[0] if sparsities else 0.5)
        return kind, device, lambda c: [m.packed if hasattr(m, "packed") else m for m in
                                        _listed(fn(c(params), sparsity))]
    if kind == "masked_sgd_":
        momentum = draw(st.sampled_from((0.0, 0.9)))
        bufs = [like(i) for i in range(n)] if momentum else []
        grads = [like(i) for i in range(n)][:draw(st.sampled_from((n, n, n, n - 1)))]
        first = [draw(st.booleans()) for _ in bufs]
        flags = dict(lr=draw(st.sampled_from((0.1, 0.0))), momentum=momentum,
                     dampening=draw(st.sampled_from((0.0, 0.1))) if momentum else 0.0,
                     weight_decay=draw(st.sampled_from((0.0, 1e-2))), nesterov=False,
                     maximize=draw(st.booleans()))
        if direct:
            def call(c):
                p, g, b = c(params), c(grads), c(bufs)
                torch.ops.dsd_kernels.masked_sgd_(p, g, b, c(words), first, *flags.values())
                return p + b
            return kind, device, call

        def call(c):
            p, g, b = c(params), c(grads), c(bufs) if momentum and draw_none_bufs is False else None
            dk.masked_sgd_(p, g, b, _as_masks(c(words), p), **flags)
            return p + (b or [])
        draw_none_bufs = draw(st.booleans())
        return kind, device, call
    if kind == "masked_adamw_":
        amsgrad = draw(st.booleans())
        grads, exp_avgs, exp_avg_sqs = ([like(i) for i in range(n)] for _ in range(3))
        exp_avg_sqs = [t.abs() if t.dtype.is_floating_point else t for t in exp_avg_sqs]
        maxes = [like(i) for i in range(n)] if amsgrad else []
        maxes = [t.abs() if t.dtype.is_floating_point else t for t in maxes]
        steps = [torch.tensor(float(draw(st.integers(0, 3))), device=device) for _ in range(n)]
        flags = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=draw(st.sampled_from((0.0, 1e-2))),
                     amsgrad=amsgrad, maximize=draw(st.booleans()))
        if direct:
            def call(c):
                p, g, a, s, m, k = c(params), c(grads), c(exp_avgs), c(exp_avg_sqs), c(maxes), c(steps)
                torch.ops.dsd_kernels.masked_adamw_(p, g, a, s, m, k, c(words), *flags.values())
                return p + a + s + m + k
            return kind, device, call

        def call(c):
            p, g, a, s, m, k = c(params), c(grads), c(exp_avgs), c(exp_avg_sqs), c(maxes), c(steps)
            dk.masked_adamw_(p, g, a, s, m, k, _as_masks(c(words), p), **flags)
            return p + a + s + m + k
        return kind, device, call
    if kind == "apply_masks_":
        if direct:
            def call(c):
                t = c(params)
                torch.ops.dsd_kernels.apply_masks_(t, c(words))
                return t
            return kind, device, call

        def call(c):
            t = c(params)
            dk.apply_masks_(t, _as_masks(c(words), t))
            return t
        return kind, device, call
    # masked_linear and its backward
    out_f, in_f = draw(st.sampled_from((0, 1, 3, 40, 70))), draw(st.sampled_from((0, 1, 5, 33, 64)))
    if draw(st.integers(0, 9)) == 0:
        out_f = draw(st.sampled_from((2, 4)))
    weight = draw(tensors_like((out_f, in_f), dtype, device, bad=0.1))
    x_shape = draw(st.sampled_from(((3, in_f), (2, 2, in_f), (0, in_f), (in_f,), (3, in_f + 1))))
    x = draw(tensors_like(x_shape, dtype, device, bad=0.1))
    words1 = draw(mask_words((out_f, in_f), device, allow_none=False))
    bias = draw(tensors_like((out_f,), dtype, device)) if draw(st.booleans()) else None
    if kind == "masked_linear":
        if direct:
            return kind, device, lambda c: [torch.ops.dsd_kernels.masked_linear(c(x), c(weight), c(words1), c(bias))]
        return kind, device, lambda c: [dk.masked_linear(c(x), c(weight), c(words1), c(bias))]
    grad = draw(tensors_like((*x_shape[:-1], out_f), dtype, device, bad=0.1))
    needs = (draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
    return kind, device, lambda c: list(torch.ops.dsd_kernels.masked_linear_backward(
        c(grad), c(x), c(weight), c(words1), *needs))


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_masks(words, tensors):
    """Packed words as the wrappers take masks: dk.Mask of the tensor's shape (or the raw words
    where they cannot be one, to see the wrapper refuse them)."""
    out = []
    for w, t in zip(words, tensors):
        if w is None or w.dtype != torch.int32 or tuple(w.shape) != packed_shape(t.shape) or w.device.type == "meta":
            out.append(w)
        else:
            out.append(dk.Mask(w, t.shape))
    return out


# ---------------------------------------------------------------- running one call
def _copier(value):
    """A fresh copy of every input, keeping its layout (strides, expansion, offset)."""
    if isinstance(value, list):
        return [_copier(v) for v in value]
    if not isinstance(value, torch.Tensor):
        return value
    if value.device.type == "meta":
        return value  # nothing is computed on meta
    storage = value.untyped_storage().clone()
    out = value.new_empty(0)
    out.set_(storage, value.storage_offset(), value.shape, value.stride())
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.dtype.is_floating_point:
        t = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _same_bits(a, b) -> bool:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if not isinstance(a, torch.Tensor):
        return a == b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _close(a, b) -> bool:
    """For the matmuls: the backends sum in other orders, so the bits may differ; the values
    agree to the dtype's tolerance and the shapes and dtypes exactly."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(a.dtype, 1e-4)
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)


def _interpreter_cannot_loop() -> bool:
    """Triton's interpreter here cannot run masked_linear's loop (see interpreter.py); the
    fuzz then leaves masked_linear's Triton backend out and says so once."""
    from .interpreter import interpreter_lacks, interpreting
    reason = interpreting() and interpreter_lacks("loaded_range")
    if reason and not _SAID:
        print(f"masked_linear's Triton backend left out: {reason}", file=sys.stderr)
        _SAID.append(reason)
    return bool(reason)


_SAID: list[str] = []


def run_one(name, device, call, backends) -> None:
    COUNTS["calls"] += 1
    outcomes = {}
    if name.startswith("masked_linear") and "triton" in backends and _interpreter_cannot_loop():
        backends = tuple(b for b in backends if b != "triton")
    for backend in ("torch",) + tuple(backends):
        with dk.use_backend(backend):
            try:
                outcomes[backend] = ("ok", [t for t in _listed(call(_copier)) if t is not None])
            except (ValueError, TypeError, RuntimeError) as e:
                message = str(e)
                names = ARGUMENTS[name]
                if not any(re.search(rf"\b{re.escape(a)}\b", message) for a in names):
                    raise Finding(f"{name} on {backend}: {type(e).__name__} names no argument: {message[:400]}")
                outcomes[backend] = ("raised", message)
            except Exception as e:  # noqa: BLE001 - any other error is a finding
                raise Finding(f"{name} on {backend}: {type(e).__name__} from deep inside: "
                              f"{traceback.format_exc()[-1500:]}") from e
    reference = outcomes["torch"]
    for backend in backends:
        got = outcomes[backend]
        if got[0] == "ok" and reference[0] == "raised":
            raise Finding(f"{name} on {backend} accepted what the torch backend refused: {reference[1][:300]}")
        if got[0] == "ok" and device != "meta":
            # the Triton interpreter is not an optimizer's CPU path: its float32 division may round
            # 1 ulp apart from torch's (the GPU bits are tests/test_gpu.py's)
            inexact = name.startswith("masked_linear") or (backend == "triton" and name.startswith("masked_"))
            same = _close if inexact else _same_bits
            if len(got[1]) != len(reference[1]) or not all(same(a, b) for a, b in zip(got[1], reference[1])):
                diffs = [(a.double() - b.double()).abs().max().item() if isinstance(a, torch.Tensor) and a.numel()
                          and a.shape == b.shape and a.dtype.is_floating_point else None
                          for a, b in zip(got[1], reference[1])]
                raise Finding(f"{name} on {backend}: results differ from the torch backend's "
                              f"(largest differences per output: {diffs})")
    if device == "meta":
        COUNTS["meta"] += 1
    elif all(o[0] == "ok" for o in outcomes.values()):
        COUNTS["same_bits"] += 1
    else:
        COUNTS["raised"] += 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="cpp")
    args = parser.parse_args(argv)
    backends = tuple(b for b in args.backends.split(",") if b and b in dk.available_backends())

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, derandomize=False, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(calls())
    def fuzz(drawn):
        name, device, call = drawn
        note(f"call {name} on {device}")
        run_one(name, device, call, backends)

    try:
        fuzz()
    except Finding as e:
        print(f"FINDING: {e}", *getattr(e, "__notes__", ()), sep="\n", file=sys.stderr)
        print(json.dumps({**COUNTS, "backends": backends, "ok": False}))
        return 1
    print(json.dumps({**COUNTS, "backends": backends, "ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
