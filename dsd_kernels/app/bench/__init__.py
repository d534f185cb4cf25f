"""The benchmarks of `dsd-kernels bench` and benchmarks/bench_*.py: the cases of every op
(cases.py), how they are timed and written (timing.py), and the roofline cost model that
predicts them for a GPU (cost_model.py, printed apart, never mixed with measurements)."""
from .cases import (BLOCK_SPARSITIES, CASE_FACTORIES, GPU_LINEAR_SHAPES, THRESHOLD_SIZES_M, apply_masks_cases,
                    gpt2_small_param_shapes, magnitude_select_cases, mask_multiply_baselines,
                    masked_adamw_cases, masked_linear_cases, masked_sgd_cases, nm_masks_cases, resnet50_sgd_shapes,
                    resnet50_weight_shapes)
from .host_step import HOST_STEP_SHAPES, host_step_cases
from .timing import (COPY_REFERENCE_BYTES, ROUNDS, Case, benchmark_backends, copy_reference, cpu_model, device_label, device_time,
                     environment, format_row, run_case, time_callable, write_results)

__all__ = ["BLOCK_SPARSITIES", "CASE_FACTORIES", "COPY_REFERENCE_BYTES", "GPU_LINEAR_SHAPES", "THRESHOLD_SIZES_M", "Case", "ROUNDS",
           "apply_masks_cases", "benchmark_backends", "copy_reference", "cpu_model", "device_label",
           "device_time", "environment", "format_row", "gpt2_small_param_shapes", "HOST_STEP_SHAPES", "host_step_cases",
           "magnitude_select_cases", "mask_multiply_baselines", "masked_adamw_cases", "masked_linear_cases",
           "masked_sgd_cases", "nm_masks_cases", "resnet50_sgd_shapes", "resnet50_weight_shapes", "run_case",
           "time_callable", "write_results"]
