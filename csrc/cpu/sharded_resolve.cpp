// The sharded selection's bracket path after its collectives, per shard: the gathered keys split
// by bucket (bucket_split_) and the kept bits of the gathered keys set once the global threshold
// is known (resolve_masks_). The pass before: sharded_bracket.cpp; shared pieces: selection.h.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "selection.h"

namespace dsd_kernels_cpu {
namespace {

using namespace selection;

// ---- the gathered keys' bits: helpers of bucket_split_ and resolve_masks_

// fn(key pointer, position pointer or nullptr when positions is empty) for the key and position
// dtypes of entry i (keys int16/int32/int64, positions int32/int64)
template <typename F>
void with_keys_and_positions(const char* op, size_t i, const at::Tensor& keys, const at::Tensor& positions, F fn) {
  auto with_keys = [&](const auto* key) {
    if (positions.numel() == 0) {
      fn(key, static_cast<const int64_t*>(nullptr));
    } else if (positions.scalar_type() == at::kInt) {
      fn(key, positions.data_ptr<int32_t>());
    } else {
      TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions[", i, "] must be int32 or int64");
      fn(key, positions.data_ptr<int64_t>());
    }
  };
  switch (keys.scalar_type()) {
    case at::kShort: with_keys(keys.data_ptr<int16_t>()); break;
    case at::kInt: with_keys(keys.data_ptr<int32_t>()); break;
    case at::kLong: with_keys(keys.data_ptr<int64_t>()); break;
    default: TORCH_CHECK(false, op, ": keys[", i, "] must be int16, int32 or int64 keys");
  }
}

template <typename pos_t>
void check_positions(const MaskLayout& lay, const pos_t* pos, int64_t count, const char* op, size_t i) {
  using upos_t = std::make_unsigned_t<pos_t>;  // a negative position is out of range as a huge one
  upos_t largest = 0;
  for (int64_t j = 0; j < count; ++j) largest = std::max(largest, static_cast<upos_t>(pos[j]));  // vectorised
  TORCH_CHECK(count == 0 || static_cast<uint64_t>(largest) < static_cast<uint64_t>(lay.rows * lay.cols), op,
              ": positions[", i, "] out of range");
}

// the keep-bit of flat position `flat`
inline void keep_bit(const MaskLayout& lay, uint32_t* out, int64_t flat) {
  const int64_t row = flat / lay.cols, col = flat - row * lay.cols;
  out[row * lay.words_per_row + col / 32] |= uint32_t(1) << (col % 32);
}

// the keep-bits of the gathered keys above `threshold`
template <typename key_t, typename pos_t>
void keep_above(const MaskLayout& lay, uint32_t* out, const key_t* key, const pos_t* pos, int64_t count,
                int64_t threshold) {
  if (lay.cols % 32 == 0) {  // flat position / 32 is the word; branch-free (about half are above)
    for (int64_t j = 0; j < count; ++j) {
      const auto flat = static_cast<int64_t>(pos[j]);
      out[flat >> 5] |= static_cast<uint32_t>(static_cast<int64_t>(key[j]) > threshold) << (flat & 31);
    }
    return;
  }
  for (int64_t j = 0; j < count; ++j) {
    if (static_cast<int64_t>(key[j]) > threshold) keep_bit(lay, out, static_cast<int64_t>(pos[j]));
  }
}

// bucket_split_ for one tensor
template <typename key_t, typename pos_t>
void split_one(const MaskLayout& lay, uint32_t* out, const key_t* key, const pos_t* pos, int64_t count, int64_t lo,
               int64_t hi, int64_t width, int64_t* payload, std::vector<int64_t>* bucket_positions, size_t index) {
  if (out != nullptr) check_positions(lay, pos, count, "bucket_split_", index);
  // the payload and the bucket's positions from the indices of the bucket's keys
  auto emit = [&](const auto* indices, int64_t in_bucket) {
    TORCH_CHECK(in_bucket <= width, "bucket_split_: more than widths[", index, "] keys in the bucket");
    for (int64_t b = 0; b < in_bucket; ++b) {
      payload[b] = static_cast<int64_t>(key[indices[b]]);
      if (pos != nullptr) bucket_positions->push_back(static_cast<int64_t>(pos[indices[b]]));
    }
    std::fill(payload + in_bucket, payload + width, int64_t(-1));
  };
  if constexpr (sizeof(key_t) == 4 && std::is_same_v<pos_t, int32_t>) {
    // the AVX2 or AVX-512 build of csrc/cpu/isa/compress_kernel.h (the default build takes the
    // loop below)
    if (out != nullptr && lay.cols % 32 == 0 && cpu_capability() != CpuCapability::kDefault && lo >= 0 &&
        hi < (int64_t(1) << 32)) {
      // the kept positions first, then their bits: half the keys, and no store per key
      int32_t* above = thread_scratch<int32_t>(2 * static_cast<size_t>(count) + 32);
      int32_t* inside = above + count + 16;
      const auto* key32 = reinterpret_cast<const int32_t*>(key);
      int64_t over = 0, in_bucket = 0;
      DSD_ISA_KERNEL(split_keys32)(key32, pos, count, static_cast<uint32_t>(lo), static_cast<uint32_t>(hi), above,
                                   &over, inside, &in_bucket);
      emit(inside, in_bucket);
      for (int64_t j = 0; j < over; ++j) out[above[j] >> 5] |= uint32_t(1) << (above[j] & 31);
      return;
    }
  }
  // the indices of the bucket's keys, compacted without a branch (a branch per key costs more
  // than the loop), into the calling thread's scratch
  const auto span = static_cast<uint64_t>(hi - lo);
  int64_t* picked = thread_scratch<int64_t>(static_cast<size_t>(count) + 1);
  int64_t in_bucket = 0;
  for (int64_t j = 0; j < count; ++j) {
    picked[in_bucket] = j;
    in_bucket += static_cast<uint64_t>(static_cast<int64_t>(key[j]) - lo) <= span;
  }
  emit(picked, in_bucket);
  if (out != nullptr) keep_above(lay, out, key, pos, count, hi);
}

// Once the ranks know each tensor's threshold bucket [lo[i], hi[i]]: one int64 payload holding,
// per tensor, the gathered keys inside the bucket padded with -1 to widths[i] (what a rank sends
// the others), each tensor's bucket-key positions (in the keys' order), and, where words are
// given (masks wanted), the kept bits of the gathered keys above the bucket set in them.
std::tuple<at::Tensor, std::vector<at::Tensor>> bucket_split_(at::TensorList tensors, at::TensorList words,
                                                              at::TensorList keys, at::TensorList positions,
                                                              at::IntArrayRef lo, at::IntArrayRef hi,
                                                              at::IntArrayRef widths) {
  const size_t count = tensors.size();
  TORCH_CHECK((words.empty() || words.size() == count) && keys.size() == count && positions.size() == count &&
                  lo.size() == count && hi.size() == count && widths.size() == count,
              "bucket_split_: every argument must have one entry per tensor (words: or none)");
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(widths[i] >= 0 && lo[i] <= hi[i], "bucket_split_: bad entry ", i);
    total += widths[i];
  }
  at::Tensor payload = at::empty({total}, at::kLong);
  std::vector<at::Tensor> bucket_positions;
  int64_t offset = 0;
  for (size_t i = 0; i < count; ++i) {
    const MaskLayout lay(tensors[i]);
    uint32_t* out = nullptr;
    if (!words.empty()) {
      TORCH_CHECK(words[i].is_contiguous() && words[i].scalar_type() == at::kInt &&
                      words[i].numel() == lay.num_words() && positions[i].numel() == keys[i].numel(),
                  "bucket_split_: words[", i, "] or positions[", i, "] does not match tensors[", i, "]");
      out = reinterpret_cast<uint32_t*>(words[i].data_ptr<int32_t>());
    }
    const at::Tensor k = keys[i].contiguous();
    std::vector<int64_t> picked;
    with_keys_and_positions("bucket_split_", i, k, positions[i].contiguous(), [&](const auto* key, const auto* pos) {
      split_one(lay, out, key, pos, k.numel(), lo[i], hi[i], widths[i], payload.data_ptr<int64_t>() + offset,
                &picked, i);
    });
    offset += widths[i];
    at::Tensor pos_out = at::empty({static_cast<int64_t>(picked.size())}, at::kLong);
    std::copy(picked.begin(), picked.end(), pos_out.data_ptr<int64_t>());
    bucket_positions.push_back(pos_out);
  }
  return {payload, bucket_positions};
}

// resolve_masks_ for one tensor
template <typename key_t, typename pos_t>
void resolve_one(const MaskLayout& lay, uint32_t* out, const key_t* key, const pos_t* pos, int64_t count,
                 int64_t threshold, int64_t prune_ties, size_t index) {
  check_positions(lay, pos, count, "resolve_masks_", index);
  keep_above(lay, out, key, pos, count, threshold);
  std::vector<int64_t> tied;
  for (int64_t j = 0; j < count; ++j) {
    if (static_cast<int64_t>(key[j]) == threshold) tied.push_back(static_cast<int64_t>(pos[j]));
  }
  std::sort(tied.begin(), tied.end());  // ties are pruned lowest flat index first
  for (auto j = static_cast<size_t>(std::min<int64_t>(prune_ties, static_cast<int64_t>(tied.size())));
       j < tied.size(); ++j) {
    keep_bit(lay, out, tied[j]);
  }
}

// Sets, in the words bracket_pass wrote, the kept bits among the gathered keys once the exact
// threshold key thresholds[i] is known: key > threshold, and of the keys equal to it all but the
// first prune_ties[i] in flat order.
void resolve_masks_(at::TensorList tensors, at::TensorList words, at::TensorList keys, at::TensorList positions,
                    at::IntArrayRef thresholds, at::IntArrayRef prune_ties) {
  const size_t count = tensors.size();
  TORCH_CHECK(words.size() == count && keys.size() == count && positions.size() == count &&
                  thresholds.size() == count && prune_ties.size() == count,
              "resolve_masks_: every argument must have one entry per tensor");
  for (size_t i = 0; i < count; ++i) {
    const MaskLayout lay(tensors[i]);
    TORCH_CHECK(words[i].is_contiguous() && words[i].scalar_type() == at::kInt && words[i].numel() == lay.num_words(),
                "resolve_masks_: words[", i, "] is not tensors[", i, "]'s packed mask");
    TORCH_CHECK(positions[i].numel() == keys[i].numel() && thresholds[i] >= 0 && prune_ties[i] >= 0,
                "resolve_masks_: bad entry ", i);
    const at::Tensor k = keys[i].contiguous();
    uint32_t* out = reinterpret_cast<uint32_t*>(words[i].data_ptr<int32_t>());
    with_keys_and_positions("resolve_masks_", i, k, positions[i].contiguous(), [&](const auto* key, const auto* pos) {
      resolve_one(lay, out, key, pos, k.numel(), thresholds[i], prune_ties[i], i);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("bucket_split_", &bucket_split_);
  m.impl("resolve_masks_", &resolve_masks_);
}

}  // namespace dsd_kernels_cpu
