"""Cheaper models from trained ones: weight quantization (`quantize`) and model fusion (`merge`).
Every function works on sharded params under the active layout and writes ordinary workdirs."""
