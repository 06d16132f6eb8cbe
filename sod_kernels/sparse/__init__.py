"""The sparse teacher's distillation loss (``fused_sparse_sod_loss``): the KL on top-k log-probs with a tail
bucket, with a chunked PyTorch backend and a Triton backend on the chunked core."""
