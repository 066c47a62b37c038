"""Training strategies: quantization of frozen stacks (masking and caching arrive with the
trainers)."""
