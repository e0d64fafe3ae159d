"""Making a trained model cheaper: quantization, pruning, merging. Uses model and parallel; train and tools call it."""
