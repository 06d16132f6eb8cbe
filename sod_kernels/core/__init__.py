"""The layer under every loss: validation, runtime helpers, the row-chunk machinery (logit blocks, gradient
accumulation), PyTorch tiles and the shared Triton pieces.  Imports nothing else of the package."""
