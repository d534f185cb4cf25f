// The portable kernels (isa_kernels.h) compiled for AVX-512 (F, BW, VL, DQ: what ATen's AVX512
// build asks), chosen at run time (cpu_capability.h). As avx2.cpp: its own flags from setup.py
// (x86-64 only), linked after everything else.
#include "isa_kernels.h"
#if defined(CPU_CAPABILITY_AVX512)
#include "kernels.h"
#else
#include <stdexcept>
namespace dsd_kernels_cpu::isa::AVX512 {
bool built() { return false; }
void tile_panel_rows(const tile_gemm::Panel&, int64_t, int64_t) { throw std::logic_error("AVX-512 kernels not built"); }
void pack_tile(const float*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, float*) {
  throw std::logic_error("AVX-512 kernels not built");
}
void zero_pruned_fp32(float*, const int32_t*, int64_t) { throw std::logic_error("AVX-512 kernels not built"); }
void masked_sgd_fp32(const SgdRow&) { throw std::logic_error("AVX-512 kernels not built"); }
void adamw_second_moments_fp32(const AdamwSpan&, float*, float*) { throw std::logic_error("AVX-512 kernels not built"); }
void adamw_update_fp32(const AdamwSpan&, const float*, const float*, const float*) {
  throw std::logic_error("AVX-512 kernels not built");
}
void adamw_fused_fp32(const AdamwSpan&) { throw std::logic_error("AVX-512 kernels not built"); }
void few_rows_forward(const few_rows::Problem&, int, const float*, const float*, float*, int64_t, int64_t) {
  throw std::logic_error("AVX-512 kernels not built");
}
void few_rows_grad_input(const few_rows::Problem&, int, const float*, float*, int64_t, int64_t) {
  throw std::logic_error("AVX-512 kernels not built");
}
void few_rows_grad_weight(const few_rows::Problem&, int, const float*, const float*, float*, int64_t, int64_t) {
  throw std::logic_error("AVX-512 kernels not built");
}
int64_t bracket_chunk_fp32(const float*, int64_t, uint32_t, uint32_t, int64_t*, uint32_t*) {
  throw std::logic_error("AVX-512 kernels not built");
}
void split_by_mask32(const uint32_t*, const uint32_t*, const int32_t*, int64_t, uint32_t*, int64_t, uint32_t*, int64_t) {
  throw std::logic_error("AVX-512 kernels not built");
}
int64_t classify_words_fp32(const float*, int64_t, uint32_t, uint32_t, bool, int32_t*, uint32_t*, int32_t*, int64_t*) {
  throw std::logic_error("AVX-512 kernels not built");
}
void split_keys32(const int32_t*, const int32_t*, int64_t, uint32_t, uint32_t, int32_t*, int64_t*, int32_t*, int64_t*) {
  throw std::logic_error("AVX-512 kernels not built");
}
void popcount_scan(const int32_t*, int64_t, int64_t, int64_t*) { throw std::logic_error("AVX-512 kernels not built"); }
void above_words_fp32(const float*, int64_t, uint32_t, int32_t*) { throw std::logic_error("AVX-512 kernels not built"); }
void words_2_4_fp32(const float*, int32_t*, int64_t) { throw std::logic_error("AVX-512 kernels not built"); }
}  // namespace dsd_kernels_cpu::isa::AVX512
#endif
