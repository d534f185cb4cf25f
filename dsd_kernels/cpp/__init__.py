"""Adapters from the backend-neutral signatures of ops.py to the compiled CPU kernels in
csrc/ (torch.ops.dsd_kernels_cpp.*, loaded from dsd_kernels._C)."""
