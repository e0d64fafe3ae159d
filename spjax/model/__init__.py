"""The Transformer: config and size table, block, attention kernels. Knows logical axis names only.
May import spjax.parallel.sharding (the vocabulary and `constrain`), never train, infer or tools."""
