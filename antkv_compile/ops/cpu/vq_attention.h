// Declarations shared by the two translation units of the CPU extension (ops/cpu/__init__.py builds
// attention.cpp and write.cpp into one library): what write.cpp's static step calls in attention.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

// Attention over a compressed K / V whose buffers are filled in part (see attention.cpp).
std::vector<at::Tensor> vq_attention_filled(const at::Tensor& qg, int64_t T, const at::Tensor& k_codes, const at::Tensor& k_cent,
                                            const at::Tensor& k_arows, const at::Tensor& k_apos, int64_t Ak,
                                            const at::Tensor& k_win, const at::Tensor& k_err, const at::Tensor& v_codes,
                                            const at::Tensor& v_cent, const at::Tensor& v_arows, const at::Tensor& v_apos,
                                            int64_t Av, const at::Tensor& v_win, const at::Tensor& v_err,
                                            const c10::optional<at::Tensor>& attn_mask, bool is_causal, double scale, int64_t L,
                                            int64_t chunk_tokens);
