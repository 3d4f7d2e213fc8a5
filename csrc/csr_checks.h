// Argument checks shared by the CPU backwards that take canonical CSR rows.

#pragma once

#include <torch/extension.h>

#include <string>

namespace aosae {

// row_ptr [m+1] int64, cols [nnz] int64, vals [nnz] float32/float64, n in [min_n, 2^31).
inline void check_csr_rows(const std::string& fn, const torch::Tensor& row_ptr, const torch::Tensor& cols,
                           const torch::Tensor& vals, int64_t n, int64_t min_n) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kLong &&
                  cols.scalar_type() == at::kLong && vals.dim() == 1 && vals.sizes() == cols.sizes(),
              fn, ": expects CSR row_ptr [m+1] int64, cols [nnz] int64, vals [nnz]");
  TORCH_CHECK(vals.scalar_type() == at::kFloat || vals.scalar_type() == at::kDouble,
              fn, ": vals must be float32 or float64");
  TORCH_CHECK(n >= min_n && n < (int64_t(1) << 31), fn, ": n must be in [", min_n, ", 2^31)");
}

}  // namespace aosae
