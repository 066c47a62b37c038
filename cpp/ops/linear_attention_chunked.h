// Linear attention by chunked prefix sums of matrix products, on any device (see the .cpp).
// The CUDA dispatch of stackwise::linear_attention uses it; CPU tests reach it through
// stackwise._C._linear_attention_chunked and _linear_attention_chunked_backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace stackwise {

// Positions per chunk: the intra-chunk products are chunk x chunk tiles.
constexpr int64_t kLinearAttentionChunk = 64;

at::Tensor linear_attention_chunked(const at::Tensor& phi_q, const at::Tensor& phi_k,
                                    const at::Tensor& v, bool causal, double eps,
                                    int64_t chunk = kLinearAttentionChunk);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_chunked_backward(
    const at::Tensor& grad_out, const at::Tensor& phi_q, const at::Tensor& phi_k,
    const at::Tensor& v, bool causal, double eps, int64_t chunk = kLinearAttentionChunk);

}  // namespace stackwise
