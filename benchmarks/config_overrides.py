"""`--set KEY=VALUE` for the quality benchmarks: one config override, its value a Python literal."""

import argparse
import ast


def override(text: str) -> tuple:
  """"KEY=VALUE" -> (KEY, VALUE as a Python literal, else the string)."""
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value
