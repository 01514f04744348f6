"""The process around MLX: OpenBLAS preload, glibc heap tuning, torch kept out, the CPU fast
paths (fused ops, BLAS for quantized layers) and atomic file writes. Imported before mlx.core:
keep this file free of imports."""
