// The interface between the fused CPU kernels (salu_cpu.cpp, ATen headers only) and their bindings (salu_bind.cpp,
// pybind11 and the autograd API): the op codes and the two entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace salunet {

// must match _OP_CODE in salunet/nn/kernels.py.
// SALU_ADD_*: gate(SALU(x) + res), the tail of a residual block (norm closing the branch, sum, gate) in one pass
enum Op : int64_t { SALU = 0, SWALU = 1, GALU = 2, SALU_SWALU = 3, SALU_GALU = 4, SALU_ADD_SWALU = 5, SALU_ADD_GALU = 6 };

constexpr bool has_residual(int64_t op) { return op == SALU_ADD_SWALU || op == SALU_ADD_GALU; }
constexpr bool is_pair(int64_t op) { return op == SALU_SWALU || op == SALU_GALU || has_residual(op); }
constexpr bool is_normal_gate(int64_t op) { return op == GALU || op == SALU_GALU || op == SALU_ADD_GALU; }
constexpr int64_t n_stages(int64_t op) { return is_pair(op) ? 2 : 1; }

// y = op(x[, res]) written into `out` (same storage layout as x: dense, in the memory order of the layout
// (outer, C, inner)); `params` are a, b per stage (or their logs when log_limit >= 0), 1 or C values each.
void salu_forward(int64_t op, at::Tensor x, std::vector<at::Tensor> params, double log_limit, at::Tensor out,
                  int64_t outer, int64_t C, int64_t inner, c10::optional<at::Tensor> res);

// dL/dx written into `gx` (and dL/dres into `gres` for the residual ops); returns the parameters' gradients.
std::vector<at::Tensor> salu_backward(int64_t op, at::Tensor g, at::Tensor x, std::vector<at::Tensor> params,
                                      double log_limit, at::Tensor gx, int64_t outer, int64_t C, int64_t inner,
                                      c10::optional<at::Tensor> res, c10::optional<at::Tensor> gres);

// The projected gradient of --salu-project-grad: out = g - x * coef per channel (see salu_cpu.cpp); returns this
// batch's per-channel sums (2, C) in double.
at::Tensor radial_project(at::Tensor g, at::Tensor x, at::Tensor out, int64_t outer, int64_t C, int64_t inner,
                          c10::optional<at::Tensor> running, double rate);

}  // namespace salunet
