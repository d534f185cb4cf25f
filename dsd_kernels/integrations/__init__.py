"""DSD inside other trainers: one callback each, resumable from the trainer's own checkpoints.

- `dsd_kernels.integrations.lightning.DSDCallback` (needs `lightning`: pip install dsd-kernels[lightning])
- `dsd_kernels.integrations.transformers.DSDCallback` (needs `transformers` and `accelerate`:
  pip install dsd-kernels[transformers])

Importing dsd_kernels (or this package) imports neither trainer; each module imports its own.
"""
