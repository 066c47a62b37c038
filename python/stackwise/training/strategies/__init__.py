"""Training strategies: quantization of frozen stacks and the activation cache (masking
arrives with the trainers)."""
