"""Where a stream is remembered: the per-layer KV store, its preallocated buffers, the
position arithmetic (RoPE re-rotation on compaction) and non-blocking host/GPU copies."""
