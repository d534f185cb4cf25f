// Schemas of the compiled backend ops, shared by the extension (csrc/dsd_kernels.cpp, namespace
// dsd_kernels_cpp) and the CUDA-emulation test build (tests/cuda_emulation).
#pragma once

namespace dsd_kernels_schemas {
// thresholds as float64 (exact for every float dtype), packed keep-masks when want_masks
constexpr const char* kMagnitudeSelect =
    "magnitude_select(Tensor[] tensors, float[] sparsities, bool want_masks) -> (Tensor, Tensor[])";
// the per-shard kernels of the sharded (DTensor) selection, CPU only (dsd_kernels/distributed.py)
constexpr const char* kRadixHistogram =
    "radix_histogram(Tensor[] sources, int[] prefixes, int shift, int width, bool gather, "
    "float[] quantiles) -> (Tensor, Tensor[], int[])";
constexpr const char* kThresholdMasks =
    "threshold_masks(Tensor[] tensors, int[] keys, int[] prune_ties, int[] ties) -> Tensor[]";
constexpr const char* kBracketPass =
    "bracket_pass(Tensor[] shards, float[] quantiles, int[] lo, int[] hi, int[] buckets, int[] window_keys, "
    "bool want_masks) "
    "-> (Tensor, Tensor[], Tensor[], Tensor[])";
constexpr const char* kBucketSplit =
    "bucket_split_(Tensor[] tensors, Tensor(a!)[] words, Tensor[] keys, Tensor[] positions, int[] lo, int[] hi, "
    "int[] widths) -> (Tensor, Tensor[])";
constexpr const char* kResolveMasks =
    "resolve_masks_(Tensor[] tensors, Tensor(a!)[] words, Tensor[] keys, Tensor[] positions, int[] thresholds, "
    "int[] prune_ties) -> ()";
// N:M keep-masks: in every M consecutive weights of a row the N largest |w| (csrc/cpu/nm_masks.cpp)
constexpr const char* kNmMasks = "nm_masks(Tensor[] tensors, int n, int m) -> Tensor[]";
// RigL/SET's mask update (csrc/cpu/mask_update.cpp): the values at a mask's kept and pruned
// entries, in flat order; the whole update (split, both selections, new words) in one call
constexpr const char* kMaskSubsets =
    "mask_subsets(Tensor[] kept_from, Tensor[] pruned_from, Tensor[] mask_words) -> (Tensor[], Tensor[])";
constexpr const char* kMaskUpdate =
    "mask_update(Tensor[] weights, Tensor[] scores, Tensor[] mask_words, int[] counts) -> Tensor[]";
// zero the pruned entries of many tensors in place (CPU only: dsd_kernels/optim/masking.py)
constexpr const char* kApplyMasks = "apply_masks_(Tensor(a!)[] tensors, Tensor[] mask_words) -> ()";
constexpr const char* kMaskedSgd =
    "masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
    "Tensor?[] mask_words, bool[] first_step, float lr, float momentum, float dampening, "
    "float weight_decay, bool nesterov, bool maximize) -> ()";
// torch's single-tensor/foreach AdamW step with masks, CPU only; step sizes (lr / bias_correction1)
// and sqrt(bias_correction2) per tensor, computed in Python as torch computes them
constexpr const char* kMaskedAdamw =
    "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor?[] mask_words, float[] step_sizes, "
    "float[] bias_correction2_sqrts, float lr, float beta1, float beta2, float eps, "
    "float weight_decay, bool amsgrad, bool maximize) -> ()";
// the same with torch's fused AdamW bits (CPU only): its step sizes and bias corrections, the
// vector width in elements of its kernel's vector loop and of the compiler's vectorisation of the
// scalar loop after it (the last numel % vector_lanes elements)
constexpr const char* kMaskedAdamwFused =
    "masked_adamw_fused_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor?[] mask_words, float[] step_sizes, "
    "float[] bias_correction2_sqrts, float lr, float beta1, float beta2, float eps, "
    "float weight_decay, bool amsgrad, bool maximize, int vector_lanes, int epilogue_lanes) -> ()";
// AdamW's step counts advanced in place and, per tensor, lr / bias_correction1 and
// sqrt(bias_correction2) as torch computes them (CPU counts only; fused: its fused kernel's rule)
constexpr const char* kAdvanceAdamwSteps =
    "advance_adamw_steps(Tensor(a!)[] state_steps, float lr, float beta1, float beta2, bool fused) "
    "-> (float[], float[])";
constexpr const char* kMaskedLinearForward =
    "masked_linear_forward(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias, "
    "Tensor? tile_kept) -> Tensor";
constexpr const char* kMaskedLinearBackward =
    "masked_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor mask_words, "
    "bool needs_input, bool needs_weight, Tensor? tile_kept) -> (Tensor, Tensor)";
// "avx512" or "aten": what multiplies kept tiles of fp32 on this CPU (csrc/cpu/masked_linear.cpp)
constexpr const char* kMaskedLinearTileKernel = "masked_linear_tile_kernel() -> str";
// the vector ISA the CPU kernels run (DSD_KERNELS_CPU_CAPABILITY applied), and the best one here
constexpr const char* kCpuCapability = "cpu_capability() -> str";
constexpr const char* kBestCpuCapability = "best_cpu_capability() -> str";
}  // namespace dsd_kernels_schemas
