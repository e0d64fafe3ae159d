"""The Transformer: config and size table, block, attention kernels. Knows logical axis names only.
May import spjax.parallel (the vocabulary, `constrain`, the pipeline transform), never train, infer or tools."""
