"""CPU kernels for decode and prefill: packed weight formats (int8 with group scales, 16-bit) read
once per use, and attention-side kernels over the paged cache. Each fast path sits beside a slow
obvious reference that the tests hold it to."""
