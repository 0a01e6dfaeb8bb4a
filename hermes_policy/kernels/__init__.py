"""Triton kernels (split-key attention, probabilities, block attention, compaction,
summaries), the switch that turns each off, and the fused element-wise ops."""
