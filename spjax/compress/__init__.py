"""Cheaper models from trained ones: weight quantization (`quantize`), pruning (`prune`) and model
fusion (`merge`). Uses model and parallel on sharded params; train and tools call it."""
