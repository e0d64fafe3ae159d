"""Fine-tuning strategies beside spjax/train: LoRA adapters (lora.py).

May import spjax.model and spjax.parallel; never spjax.train, spjax.convert or tools.
"""
