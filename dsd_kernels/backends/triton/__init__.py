"""Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1). Imported lazily through the registry (_backend.py)."""
