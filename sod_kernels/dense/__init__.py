"""The dense teacher's distillation loss (``fused_sod_loss``): vocabulary-wide KL between two lm_heads, with a
chunked PyTorch backend and a Triton backend on the chunked core."""
