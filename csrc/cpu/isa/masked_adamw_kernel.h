// The masked AdamW step (masked_adamw.cpp) of fp32 whole-word ranges for each vector ISA with FMA:
// masked_adamw.cpp's scalar operations one for one, each a vector op with the same rounding (the
// lerp and the second moment one fused multiply-add each, every other operation rounded on its
// own), so the bits are the scalar loop's and torch's. A mask word that keeps nothing is not
// computed and its gradient not read: its weight and moments are written back as +0 only where
// they are not +0 already. Elsewhere the results are AND-ed with the word's lanes, so a pruned
// entry becomes exactly +0 whatever was computed there (NaN and inf included).
#pragma once
#include <algorithm>
#include <cstdint>

#include "vec_lanes.h"

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {
namespace {

struct AdamwLanes {
  Vec decay, avg_weight, avg_keep, beta2, sq_weight, neg_step, bc2_sqrt, eps;
  explicit AdamwLanes(const AdamwSpan& a)
      : decay(a.decay), avg_weight(a.avg_weight), avg_keep(a.avg_keep), beta2(a.beta2), sq_weight(a.sq_weight),
        neg_step(a.neg_step), bc2_sqrt(a.bc2_sqrt), eps(a.eps) {}
};

template <bool kMaximize>
inline Vec load_grad(const float* g, int64_t lanes) {
  const Vec grad = load_first(g, lanes);
  return kMaximize ? grad.neg() : grad;  // a sign flip: exact
}

// exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2): fma((1 - beta2) * g, g, v * beta2)
inline Vec new_exp_avg_sq(const Vec& v, const Vec& grad, const AdamwLanes& c) {
  return at::vec::fmadd(c.sq_weight * grad, grad, v * c.beta2);
}

// torch.maximum(old, sq) as the scalar loop takes it: old where old > sq or old is NaN, else sq
inline Vec nan_wins_maximum(const Vec& old, const Vec& sq) {
  return Vec::blendv(sq, old, (old > sq) | (old != old));
}

// param.mul_(1 - lr*wd) rounded on its own, and exp_avg.lerp_(grad, 1 - beta1) as torch's lerp:
// fma(w, g - m, m) for w < 0.5, else fma(-(g - m), 1 - w, g)
template <bool kDecay, bool kSmallWeight>
inline void decayed_weight_and_avg(const float* p, const float* m, const Vec& grad, int64_t lanes,
                                   const AdamwLanes& c, Vec& param, Vec& avg_out) {
  param = load_first(p, lanes);
  if (kDecay) param = param * c.decay;
  const Vec avg = load_first(m, lanes);
  const Vec diff = grad - avg;
  avg_out = kSmallWeight ? at::vec::fmadd(c.avg_weight, diff, avg) : at::vec::fmadd(diff.neg(), c.avg_keep, grad);
}

// param + (-step_size * exp_avg) / (root / sqrt(bias_correction2) + eps)
inline Vec updated_weight(const Vec& param, const Vec& a, const Vec& root, const AdamwLanes& c) {
  return param + (c.neg_step * a) / (root / c.bc2_sqrt + c.eps);
}

inline Vec kept(const Vec& x, uint32_t bits, bool all_kept) { return all_kept ? x : x & keep_lanes(bits); }

// fn(c, bits, lanes) for every vector of [0, n) in words that keep something (lanes = kLanes in
// whole words, where the counts fold away); words that keep nothing go to pruned(c0, len)
template <typename Step, typename Pruned>
inline void for_each_vector(const int32_t* words, int64_t n, const Step& step, const Pruned& pruned) {
  for (int64_t c0 = 0; c0 < n; c0 += 32) {
    const uint32_t word = words ? static_cast<uint32_t>(words[c0 / 32]) : 0xFFFFFFFFu;
    const int64_t len = std::min<int64_t>(32, n - c0);
    if (word == 0) {
      pruned(c0, len);
    } else if (len == 32) {
      for (int j = 0; j < 32 / kLanes; ++j) step(c0 + j * kLanes, word >> (j * kLanes), int64_t{kLanes});
    } else {  // a partial word: the range's end
      for (int64_t c = c0; c < c0 + len; c += kLanes) step(c, word >> (c - c0), std::min<int64_t>(kLanes, c0 + len - c));
    }
  }
}

inline bool all_lanes_kept(uint32_t bits, int64_t lanes) {
  const uint32_t first_lanes = (1u << lanes) - 1u;  // lanes <= 16
  return (bits & first_lanes) == first_lanes;
}

template <bool kMaximize, bool kAmsgrad>
void second_moments(const AdamwSpan& a, float* s, float* second) {
  const AdamwLanes c(a);
  for_each_vector(
      a.words, a.n,
      [&](int64_t j, uint32_t, int64_t lanes) __attribute__((always_inline)) {
        const Vec sq = new_exp_avg_sq(load_first(a.v + j, lanes), load_grad<kMaximize>(a.g + j, lanes), c);
        store_first(sq, s + j, lanes);
        if (kAmsgrad) store_first(nan_wins_maximum(load_first(a.vmax + j, lanes), sq), second + j, lanes);
      },
      [](int64_t, int64_t) {});
}

inline void clear_pruned_words(const AdamwSpan& a, int64_t c0, int64_t len) {
  for (float* t : {a.p, a.m, a.v, a.vmax}) {
    if (t != nullptr) clear_if_set(t + c0, len);
  }
}

// the decayed weight and exp_avg recomputed from p, g, m (still in cache from phase 1) rather
// than kept in buffers between the phases
template <bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>
void update(const AdamwSpan& a, const float* s, const float* second, const float* root) {
  const AdamwLanes c(a);
  for_each_vector(
      a.words, a.n,
      [&](int64_t j, uint32_t bits, int64_t lanes) __attribute__((always_inline)) {
        const bool all_kept = all_lanes_kept(bits, lanes);
        Vec param, avg;
        decayed_weight_and_avg<kDecay, kSmallWeight>(a.p + j, a.m + j, load_grad<kMaximize>(a.g + j, lanes), lanes,
                                                     c, param, avg);
        store_first(kept(updated_weight(param, avg, load_first(root + j, lanes), c), bits, all_kept), a.p + j, lanes);
        store_first(kept(avg, bits, all_kept), a.m + j, lanes);
        store_first(kept(load_first(s + j, lanes), bits, all_kept), a.v + j, lanes);
        if (kAmsgrad) store_first(kept(load_first(second + j, lanes), bits, all_kept), a.vmax + j, lanes);
      },
      [&](int64_t c0, int64_t len) { clear_pruned_words(a, c0, len); });
}

// the fused kernel's vector loop: one pass, the root the IEEE instruction
template <bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>
void fused(const AdamwSpan& a) {
  const AdamwLanes c(a);
  for_each_vector(
      a.words, a.n,
      [&](int64_t j, uint32_t bits, int64_t lanes) __attribute__((always_inline)) {
        const bool all_kept = all_lanes_kept(bits, lanes);
        const Vec grad = load_grad<kMaximize>(a.g + j, lanes);
        Vec param, avg;
        decayed_weight_and_avg<kDecay, kSmallWeight>(a.p + j, a.m + j, grad, lanes, c, param, avg);
        const Vec sq = new_exp_avg_sq(load_first(a.v + j, lanes), grad, c);
        const Vec second = kAmsgrad ? nan_wins_maximum(load_first(a.vmax + j, lanes), sq) : sq;
        store_first(kept(updated_weight(param, avg, second.sqrt(), c), bits, all_kept), a.p + j, lanes);
        store_first(kept(avg, bits, all_kept), a.m + j, lanes);
        store_first(kept(sq, bits, all_kept), a.v + j, lanes);
        if (kAmsgrad) store_first(kept(second, bits, all_kept), a.vmax + j, lanes);
      },
      [&](int64_t c0, int64_t len) { clear_pruned_words(a, c0, len); });
}

// fn.template operator()<kDecay, kMaximize, kAmsgrad, kSmallWeight>(): the options never change
// inside a range, so each combination is its own loop without branches
template <typename Fn>
void with_options(const AdamwSpan& a, const Fn& fn) {
  const int key = (a.apply_decay ? 8 : 0) | (a.maximize ? 4 : 0) | (a.vmax ? 2 : 0) | (a.small_weight ? 1 : 0);
  switch (key) {
#define DSD_CASE(K) \
  case K:           \
    return fn.template operator()<(K & 8) != 0, (K & 4) != 0, (K & 2) != 0, (K & 1) != 0>();
    DSD_CASE(0) DSD_CASE(1) DSD_CASE(2) DSD_CASE(3) DSD_CASE(4) DSD_CASE(5) DSD_CASE(6) DSD_CASE(7)
    DSD_CASE(8) DSD_CASE(9) DSD_CASE(10) DSD_CASE(11) DSD_CASE(12) DSD_CASE(13) DSD_CASE(14) DSD_CASE(15)
#undef DSD_CASE
  }
}

}  // namespace

void adamw_second_moments_fp32(const AdamwSpan& a, float* s, float* second) {
  with_options(a, [&]<bool, bool kMaximize, bool kAmsgrad, bool>() { second_moments<kMaximize, kAmsgrad>(a, s, second); });
}

void adamw_update_fp32(const AdamwSpan& a, const float* s, const float* second, const float* root) {
  with_options(a, [&]<bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>() {
    update<kDecay, kMaximize, kAmsgrad, kSmallWeight>(a, s, second, root);
  });
}

void adamw_fused_fp32(const AdamwSpan& a) {
  with_options(a, [&]<bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>() {
    fused<kDecay, kMaximize, kAmsgrad, kSmallWeight>(a);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
