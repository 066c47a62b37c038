// Rotary position embedding (Su et al. 2021, "RoFormer", eq. 34) in the "rotate_half" pairing of
// GPT-NeoX and LLaMA: within the first rotary_dim features of a head, feature i pairs with
// feature i + rotary_dim/2 (i < rotary_dim/2), and the pair is rotated by the angle
// pos * theta^(-2i/rotary_dim):
//   out_i        = x_i * cos_i - x_{i+h} * sin_i
//   out_{i+h}    = x_{i+h} * cos_i + x_i * sin_i          (h = rotary_dim / 2)
// Features from rotary_dim on pass through unchanged. The backward is the inverse rotation, the
// same formula with sin negated. Tables: cos/sin [max_positions, rotary_dim/2] float32, row p
// holding position p. Written once for the CPU tail loops and the CUDA kernels.
#pragma once

#include "stackwise/macros.h"

namespace stackwise::math {

// Rotates one pair (a = x_i, b = x_{i+h}); the backward passes -s.
template <typename acc_t>
STACKWISE_HOST_DEVICE void rope_rotate_pair(acc_t a, acc_t b, acc_t c, acc_t s, acc_t& out_a,
                                            acc_t& out_b) {
  out_a = a * c - b * s;
  out_b = b * c + a * s;
}

}  // namespace stackwise::math
