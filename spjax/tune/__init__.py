"""Fine-tuning strategies beside spjax/train: LoRA adapters (lora.py) and the distillation objective
(distill.py). May import spjax.model, spjax.parallel and spjax.convert (a teacher's weights); never
spjax.train or tools."""
