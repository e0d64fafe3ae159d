"""Every script in benchmarks/ and tools/ starts and answers --help, run as its docstring says
(`python benchmarks/X.py`, from the repository root, nothing on PYTHONPATH): a script that fails
to import, or whose help text argparse cannot format, fails here rather than in a user's hands."""

import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.relpath(p, REPO) for d in ("benchmarks", "tools")
                 for p in glob.glob(os.path.join(REPO, d, "*.py"))
                 if os.path.basename(p) != "config_overrides.py")  # a module, not a script
# Scripts that import an extra at the top (spjax[hf]); `.ci/run` installs it, `[test]` alone not.
EXTRAS = {"benchmarks/decode_quantized.py": "torch", "benchmarks/decode_speed.py": "transformers"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(script):
  if script in EXTRAS:
    pytest.importorskip(EXTRAS[script], reason=f"{script} needs spjax[hf] ({EXTRAS[script]})")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  # argparse exits 0 after --help, absl's app.run 1; a crash is a traceback, whatever the status.
  assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "usage" in (out.stdout + out.stderr).lower() or "flags" in out.stdout.lower(), out.stdout
