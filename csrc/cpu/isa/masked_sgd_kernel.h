// The masked SGD step (masked_sgd.cpp) of fp32 rows for each vector ISA with FMA: torch.optim.SGD's
// operations in its order, each a vector op with the scalar loop's rounding (every torch
// `add_(y, alpha=a)` one fused multiply-add, `buf.mul_(momentum)` rounded before the gradient is
// added), so the bits are the scalar loop's and torch's. A mask word that keeps nothing is not
// computed and its gradient not read: its weights and momentum are read and written back as +0
// only where they are not +0 already. Elsewhere the results are AND-ed with the word's lanes, so a
// pruned entry becomes exactly +0 whatever was computed there.
#pragma once
#include <algorithm>
#include <cstdint>

#include "vec_lanes.h"

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {

void masked_sgd_fp32(const SgdRow& r) {
  const Vec neg_lr(-r.lr), momentum(r.momentum), dampening(r.dampening), decay(r.weight_decay);
  const Vec mom_alpha(r.momentum_alpha);
  // lanes [c, c + lanes) under mask bits `bits`; called with lanes = kLanes for whole words, where
  // the lane counts fold away (whole-vector loads and stores)
  const auto step = [&](int64_t c, uint32_t bits, int64_t lanes) __attribute__((always_inline)) {
    const uint32_t first_lanes = (1u << lanes) - 1u;  // lanes <= 16
    const bool all_kept = (bits & first_lanes) == first_lanes;
    const Vec x = load_first(r.p + c, lanes);
    Vec d = load_first(r.g + c, lanes);
    if (r.maximize) d = d.neg();
    if (r.decay) d = at::vec::fmadd(x, decay, d);  // grad.add(param, alpha=weight_decay)
    if (r.b) {
      // buf.mul_(momentum).add_(grad, alpha=1 - dampening); the first step: buf = grad
      const Vec v = r.first ? d : at::vec::fmadd(d, dampening, load_first(r.b + c, lanes) * momentum);
      d = r.nesterov ? at::vec::fmadd(v, mom_alpha, d) : v;  // grad.add(buf, alpha=momentum)
      store_first(all_kept ? v : v & keep_lanes(bits), r.b + c, lanes);
    }
    const Vec p_new = at::vec::fmadd(d, neg_lr, x);  // param.add_(grad, alpha=-lr)
    store_first(all_kept ? p_new : p_new & keep_lanes(bits), r.p + c, lanes);
  };
  for (int64_t c0 = 0; c0 < r.n; c0 += 32) {
    const uint32_t word = static_cast<uint32_t>(r.words[c0 / 32]);
    const int64_t len = std::min<int64_t>(32, r.n - c0);
    if (word == 0) {  // nothing kept: the gradient is not read, nothing is computed
      clear_if_set(r.p + c0, len);
      if (r.b) clear_if_set(r.b + c0, len);
    } else if (len == 32) {
      for (int j = 0; j < 32 / kLanes; ++j) step(c0 + j * kLanes, word >> (j * kLanes), kLanes);
    } else {  // the row's last, partial word
      for (int64_t c = c0; c < c0 + len; c += kLanes) step(c, word >> (c - c0), std::min<int64_t>(kLanes, c0 + len - c));
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
