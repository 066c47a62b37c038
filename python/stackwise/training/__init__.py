"""Training: strategies (quantization, masking, caching) and trainers."""
