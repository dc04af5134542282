// Python bindings and the C++ autograd node of the fused CPU kernels (salu_cpu.cpp; salunet, arXiv 2606.02927).
// A translation unit of its own, so that the two compile in parallel (ninja). It includes only what it uses (the
// autograd Function API and torch's pybind11 casters): <torch/extension.h>, the whole C++ frontend, would triple
// its compile time.
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include "salu_cpu.h"

using namespace salunet;

// The autograd node of the CPU path, in C++: forward and backward never enter Python, which at batch size 1
// is most of the cost of a call (the Python autograd.Function of kernels.py costs ~0.2 ms per forward+backward).
// Saves x (the dense tensor the kernel read), the residual for the SALU_ADD_* ops, and the parameters, nothing
// else. Inputs are x, res, a1, b1, a2, b2 so that autograd tracks each one; ops without a residual pass x again
// as `res`, single-stage ops repeat (a, b) in the second slots, and those slots get no gradient.
struct SaluFunction : public torch::autograd::Function<SaluFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x, at::Tensor res,
                            at::Tensor a1, at::Tensor b1, at::Tensor a2, at::Tensor b2, int64_t op,
                            double log_limit, int64_t outer, int64_t C, int64_t inner) {
    std::vector<at::Tensor> params = {a1.reshape(-1), b1.reshape(-1)};
    if (is_pair(op)) params.insert(params.end(), {a2.reshape(-1), b2.reshape(-1)});
    auto out = at::empty_like(x);
    salu_forward(op, x, params, log_limit, out, outer, C, inner, res);
    std::vector<at::Tensor> keep = {x, a1, b1};
    if (is_pair(op)) keep.insert(keep.end(), {a2, b2});
    if (has_residual(op)) keep.push_back(res);
    ctx->save_for_backward(keep);
    ctx->saved_data["op"] = op;
    ctx->saved_data["log_limit"] = log_limit;
    ctx->saved_data["layout"] = std::vector<int64_t>{outer, C, inner};
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "salunet: the C++ SALU kernels have no double backward (create_graph=True); for higher-order "
                "gradients use SALUNET_KERNELS=eager");
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const int64_t op = ctx->saved_data["op"].toInt();
    const double log_limit = ctx->saved_data["log_limit"].toDouble();
    const auto layout = ctx->saved_data["layout"].toIntVector();
    std::vector<at::Tensor> params = {saved[1].reshape(-1), saved[2].reshape(-1)};
    if (is_pair(op)) params.insert(params.end(), {saved[3].reshape(-1), saved[4].reshape(-1)});
    c10::optional<at::Tensor> res, gres;
    if (has_residual(op)) {
      res = saved[5];
      gres = at::empty_like(x);
    }
    // the kernel walks x's memory order: give dL/dy the same layout (contiguous or channels_last) and dtype
    auto g = grads[0].to(x.scalar_type()).contiguous(x.suggest_memory_format());
    auto gx = at::empty_like(x);
    auto gp = salu_backward(op, g, x, params, log_limit, gx, layout[0], layout[1], layout[2], res, gres);
    torch::autograd::variable_list out = {gx, gres.value_or(at::Tensor()), gp[0].view(saved[1].sizes()),
                                          gp[1].view(saved[2].sizes()), at::Tensor(), at::Tensor()};
    if (is_pair(op)) {
      out[4] = gp[2].view(saved[3].sizes());
      out[5] = gp[3].view(saved[4].sizes());
    }
    out.resize(11);  // op, log_limit and the layout are not differentiable
    return out;
  }
};

at::Tensor salu_apply(at::Tensor x, at::Tensor res, at::Tensor a1, at::Tensor b1, at::Tensor a2,
                      at::Tensor b2, int64_t op, double log_limit, int64_t outer, int64_t C, int64_t inner) {
  return SaluFunction::apply(x, res, a1, b1, a2, b2, op, log_limit, outer, C, inner);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &salu_forward, "fused SALU-family forward (CPU)", py::arg("op"), py::arg("x"), py::arg("params"),
        py::arg("log_limit"), py::arg("out"), py::arg("outer"), py::arg("C"), py::arg("inner"),
        py::arg("res") = py::none());
  m.def("backward", &salu_backward, "fused SALU-family backward (CPU)", py::arg("op"), py::arg("g"), py::arg("x"),
        py::arg("params"), py::arg("log_limit"), py::arg("gx"), py::arg("outer"), py::arg("C"), py::arg("inner"),
        py::arg("res") = py::none(), py::arg("gres") = py::none());
  m.def("apply", &salu_apply, "fused SALU-family op with its autograd node in C++ (CPU)");
  m.def("radial_project", &radial_project, "the projected gradient of --salu-project-grad (CPU)", py::arg("g"),
        py::arg("x"), py::arg("out"), py::arg("outer"), py::arg("C"), py::arg("inner"),
        py::arg("running") = py::none(), py::arg("rate") = 1.0);
}
