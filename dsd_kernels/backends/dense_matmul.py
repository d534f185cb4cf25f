"""The fastest dense matmul torch offers for a masked_linear pass on CPU, shared by the CPU
backends' paths that multiply W*M whole (masks that keep more than BLOCKED_MAX_KEPT of their
tiles): oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, what inductor emits for CPU
linears) for fp32 where torch was built with it, else ATen's matmul (MKL or OpenBLAS).

Why: torch's own F.linear / mm take MKL's sgemm, which on CPUs MKL does not run its AVX-512 code
on (AMD's) measured slower than oneDNN in every pass and shape of the bench
(benchmarks/results/cpu-2core-x86_64.json); on an AMD CPU with AVX2 alone MKL's AVX2 sgemm measured
faster than oneDNN in every pass and shape (benchmarks/results/cpu-x86_64-avx2.json), so oneDNN is
preferred only where ATen runs AVX-512. The bench times both as baselines."""
from __future__ import annotations

import torch


def onednn_linear_available(t: torch.Tensor) -> bool:
    """Whether oneDNN's linear serves `t`'s dtype and device here."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def prefer_onednn_linear(t: torch.Tensor) -> bool:
    """Whether W*M is multiplied by oneDNN's linear rather than ATen's matmul here: oneDNN serves
    `t` and ATen runs AVX-512 (see the module's docstring)."""
    return onednn_linear_available(t) and torch.backends.cpu.get_cpu_capability() == "AVX512"


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T + bias; w and x may be transposed views (dX = linear(dY, W.t()),
    dW = linear(dY.t(), x.t()))."""
    if onednn_linear_available(x):
        # oneDNN reads the bias as dense memory: an expanded (stride 0) bias would be misread
        return torch.ops.mkldnn._linear_pointwise(x, w, None if bias is None else bias.contiguous(), "none", [], "")
    return torch.nn.functional.linear(x, w, bias)
