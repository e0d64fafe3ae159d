"""Inference on top of a trained model: KV-cache decoding and the spjax-generate command.
Imports model, parallel, convert and data; nothing below imports it."""
