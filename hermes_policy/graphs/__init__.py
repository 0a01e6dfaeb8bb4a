"""Fixed-shape forwards replayed as CUDA graphs: the answer loop and the recurring chunk
ingest, and the static text forward both run."""
