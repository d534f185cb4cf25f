"""The kernels behind the ops, one package per backend and one module per op in each, named
after the op: `torch` (composites of torch's own ops; every device), `cpp` (dsd_kernels._C,
csrc/: CPU kernels and, in a CUDA build, csrc/cuda's), `triton` (GPU, or the interpreter on
CPU). Only dsd_kernels.ops reaches them, through the registry in dsd_kernels._backend; the
helpers beside the packages (tile structure, dense matmul, AdamW step counters) serve the
backends alone."""
