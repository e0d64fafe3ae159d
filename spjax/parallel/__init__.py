"""Logical axes, layouts and their presets, meshes, HLO collectives and per-device footprints.
Knows names and meshes: imports nothing from spjax above it (model, train, infer)."""
