// RMSNorm of rows of fp32 values (a decode step's final norm), built by cpu/layer.py after vec.h,
// gemv.cpp and layer.cpp (FP32, LAYER): out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps).
// Reference: layers.RMSNorm.
extern "C" void kernel(const float* x, const float* w, float* out, const int64_t rows, const int64_t n, const float eps) {
    for (int64_t r = 0; r < rows; ++r) rms_norm(x + r * n, w, n, eps, out + r * n);
}
