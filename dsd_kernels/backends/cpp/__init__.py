"""Adapters from the backend-neutral signatures of dsd_kernels.ops to the compiled kernels of csrc/
(torch.ops.dsd_kernels_cpp.*, loaded from dsd_kernels._C): the CPU kernels of csrc/cpu and,
in a CUDA build, the CUDA kernels of csrc/cuda, registered under the same op names, so one
adapter serves both devices (the dispatcher picks the kernel by the tensors' device)."""
