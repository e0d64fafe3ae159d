"""Fine-tuning objectives and adapters: LoRA, distillation. Sits beside train; uses model and parallel."""
