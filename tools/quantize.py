"""Write a quantized copy of a spjax workdir's checkpoint.

  spjax-quantize --workdir=/tmp/run --bits=8 --out=/tmp/run-int8 [--step=N]
  spjax-quantize --workdir=/tmp/run --bits=4 --group_size=128 [--embeddings] --out=/tmp/run-int4

OUT/config.json is the run's plus "quantization" ({bits, group_size, embeddings, activations};
--activations=float|int8x2|int8 is how layers multiply by int8 per-channel weights, int8x2 by
default: spjax/compress/quantize.py); OUT's checkpoint holds the integer weights and float32
scales, sharded by the run's layout (or --layout). spjax-eval, spjax-generate and spjax-convert-hf
(which writes the dequantized weights) read OUT. Exit status 2 with one line for a bad input.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spjax.compress import quantize  # noqa: E402

if __name__ == "__main__":
  quantize.run()
