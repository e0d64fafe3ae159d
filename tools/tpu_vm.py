"""Launch spjax-train on every host of a Cloud TPU VM slice (or on a fleet of local processes).

  python tools/tpu_vm.py --tpu=NAME --zone=Z [--project=P] [--dry_run] [--env=K=V ...] \
      -- spjax-train --config=configs/slimpajama_dc.py:DC-1 --workdir=gs://BUCKET/run

What it does on a TPU VM (`--dry_run` prints the commands instead of running them):
1. Copies this checkout's committed files to every host (`git archive HEAD`, then
   `gcloud compute tpus tpu-vm scp --worker=all`), unless --install gives another install step.
2. One `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=SCRIPT`: every host runs the same
   SCRIPT: the install step (pip install of the copied checkout with its [tpu] extra), a gcsfuse
   mount at /gcs/BUCKET of every gs://BUCKET the command names (spjax reads and writes local paths;
   the mount makes one bucket the shared storage of all hosts), then the training process in the
   background (nohup; a dropped ssh does not stop it).
3. The environment of each process: SPJAX_COORDINATOR_ADDRESS=auto, so `jax.distributed` takes the
   coordinator (worker 0), the process count and each host's process index from the TPU VM's
   metadata; plus every --env. Each host writes its process's stdout and stderr to
   ~/spjax-logs/<run>.log (read with `--worker=K --command='tail -f ~/spjax-logs/<run>.log'`);
   metrics, checkpoints and config.json go to the workdir, written by process 0.

It refuses (exit 2), before touching any host, a command that is not `spjax-train ...`, whose
--workdir is not on shared storage (gs://), whose --config does not parse with its overrides, or
that sets the process flags itself.

--local_processes=N [--local_devices=D] runs the same per-host script as N local processes instead
(loopback coordinator, D simulated CPU devices each, the working tree as the checkout, any workdir):
the fleet the tests run.
"""

import os
import re
import shlex
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the checkout whose configs/ the command names

from absl import flags as absl_flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MOUNT = "/gcs"  # gs://BUCKET/path -> /gcs/BUCKET/path on every host
PROCESS_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")
_BUCKET = re.compile(r"gs://([a-z0-9][a-z0-9._-]*)")


class CommandError(ValueError):
  """The training command cannot run on the fleet; the message says why."""


def check_command(train: list[str], shared: bool) -> list[str]:
  """The spjax.main arguments of `spjax-train ARGS`, after checking what can be checked here."""
  if not train or os.path.basename(train[0]) != "spjax-train":
    raise CommandError(f"expected `-- spjax-train --config=... --workdir=...`, got "
                       f"{shlex.join(train) or 'nothing'}")
  args = train[1:]
  values = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
  for name in PROCESS_FLAGS:
    if any(a == name or a.startswith(name + "=") for a in args):
      raise CommandError(f"{name} is set for each process by tools/tpu_vm.py; leave it out")
  workdir = values.get("--workdir")
  if not workdir:
    raise CommandError("spjax-train needs --workdir=...")
  if shared and not workdir.startswith("gs://"):
    raise CommandError(f"--workdir={workdir} is not shared storage: every host writes there and "
                       "must see the others' checkpoints; use gs://BUCKET/path")
  if "--config" not in values:
    raise CommandError("spjax-train needs --config=...")
  fv = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  cwd = os.getcwd()
  try:
    os.chdir(REPO)  # config paths are relative to the checkout, as on the hosts
    fv(["spjax-train", *(a for a in args if a.startswith("--config"))])
    fv.config  # noqa: B018  (loads the file and applies the overrides)
  except Exception as e:  # config files raise whatever their get_config raises
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
      chain.append(chain[-1].__cause__ or chain[-1].__context__)
    keys = [c for c in chain if isinstance(c, KeyError)]
    message = ("unknown config key " + str(keys[0].args[0]).replace("\n", ". ") if keys
               else (str(e).strip().splitlines() or [type(e).__name__])[-1])
    raise CommandError(f"--config={values['--config']} with its overrides does not parse: "
                       f"{message}") from None
  finally:
    os.chdir(cwd)
  return args


def mounted(args: list[str]) -> tuple[list[str], list[str]]:
  """gs://BUCKET/... in the arguments -> /gcs/BUCKET/...; and the buckets to mount."""
  buckets = sorted({b for a in args for b in _BUCKET.findall(a)})
  return [_BUCKET.sub(lambda m: f"{MOUNT}/{m.group(1)}", a) for a in args], buckets


def host_script(*, checkout: str, install: str, buckets, env: dict, python: str, args,
                log: str, detach: bool) -> str:
  """The bash script every host runs: install, mount, then train with its log in `log`."""
  lines = ["set -euo pipefail"] + ([install] if install else []) + [f"cd {checkout}"]
  for b in buckets:
    lines += [f"command -v gcsfuse >/dev/null || {{ echo 'tpu_vm: gcsfuse is needed to mount gs://{b}"
              f" (cloud.google.com/storage/docs/cloud-storage-fuse/install)' >&2; exit 2; }}",
              f"sudo mkdir -p {MOUNT}/{b} && sudo chown $(id -u):$(id -g) {MOUNT}/{b}",
              f"mountpoint -q {MOUNT}/{b} || gcsfuse --implicit-dirs {b} {MOUNT}/{b}"]
  lines.append(f"mkdir -p \"$(dirname {log})\"")
  lines += [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
  train = f"{python} -m spjax.main {shlex.join(args)} > {log} 2>&1"
  lines.append(f"nohup {train} < /dev/null &\necho \"$(hostname): training, log {log}\"" if detach
               else f"exec {train}")
  return "\n".join(lines)


def extra_env(pairs) -> dict:
  env = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise CommandError(f"--env={pair}: want NAME=VALUE")
    env[key] = value
  return env


def tpu_commands(opts, train: list[str]) -> list[list[str]]:
  """The gcloud commands that start training on every host of the TPU VM `opts.tpu`."""
  args, buckets = mounted(check_command(train, shared=True))
  where = [f"--zone={opts.zone}"] + ([f"--project={opts.project}"] if opts.project else [])
  run = os.path.basename(args[[a.startswith("--workdir=") for a in args].index(True)].rstrip("/"))
  commands, install = [], opts.install
  if install is None:  # ship this checkout
    tarball = "/tmp/spjax-checkout.tar.gz"
    commands.append(["git", "-C", REPO, "archive", "--format=tar.gz", "-o", tarball, "HEAD"])
    commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                     f"{opts.tpu}:~/spjax.tar.gz", "--worker=all", *where])
    install = ('rm -rf ~/spjax && mkdir -p ~/spjax && tar -xzf ~/spjax.tar.gz -C ~/spjax && '
               'python3 -m pip install -q -e "$HOME/spjax[tpu]"')
  script = host_script(checkout="~/spjax", install=install, buckets=buckets,
                       env={"SPJAX_COORDINATOR_ADDRESS": "auto"} | extra_env(opts.env),
                       python="python3", args=args, log=f"~/spjax-logs/{run}.log",
                       detach=not opts.attach)
  commands.append(["gcloud", "compute", "tpus", "tpu-vm", "ssh", opts.tpu, "--worker=all", *where,
                   f"--command={script}"])
  return commands


def local_scripts(opts, train: list[str], port: int) -> list[str]:
  """One host script per local process: the same script, with its process's environment."""
  args = check_command(train, shared=False)
  log_dir = opts.log_dir or os.path.join(
      os.path.abspath(args[[a.startswith("--workdir=") for a in args].index(True)][10:]), "logs")
  return [host_script(
      checkout=shlex.quote(REPO), install=opts.install or "", buckets=[],
      env={"SPJAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "SPJAX_NUM_PROCESSES": opts.local_processes, "SPJAX_PROCESS_ID": i,
           "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={opts.local_devices}"}
      | extra_env(opts.env),
      python=shlex.quote(sys.executable), args=args, log=os.path.join(log_dir, f"worker-{i}.log"),
      detach=False) for i in range(opts.local_processes)]


def main(argv) -> int:
  import argparse
  p = argparse.ArgumentParser(epilog="usage: tools/tpu_vm.py --tpu=NAME --zone=Z [...] -- "
                              "spjax-train --config=... --workdir=gs://BUCKET/run",
                              description="Launch spjax-train on every host of a TPU VM.")
  p.add_argument("--tpu", help="TPU VM name (gcloud compute tpus tpu-vm list)")
  p.add_argument("--zone")
  p.add_argument("--project", default="")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--env", action="append", default=[], help="NAME=VALUE for every process")
  p.add_argument("--install", default=None, help="install step run on every host; default: copy "
                 "this checkout and pip install it with [tpu] (local fleet: none)")
  p.add_argument("--attach", action="store_true", help="train in the ssh session's foreground")
  p.add_argument("--local_processes", type=int, default=0, help="a local fleet of N processes")
  p.add_argument("--local_devices", type=int, default=4, help="simulated devices per process")
  p.add_argument("--log_dir", default="", help="local fleet: worker logs (default WORKDIR/logs)")
  if "--" not in argv:
    p.parse_args(argv)  # --help prints the usage and exits 0
    print("tpu_vm: put the training command after `--`", file=sys.stderr)
    return 2
  split = argv.index("--")
  opts = p.parse_args(argv[:split])
  train = argv[split + 1:]
  try:
    if opts.local_processes:
      with socket.socket() as sock:  # a free loopback port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
      scripts = local_scripts(opts, train, port)
      if opts.dry_run:
        for i, s in enumerate(scripts):
          print(f"# process {i}\nbash -c {shlex.quote(s)}\n")
        return 0
      procs = [subprocess.Popen(["bash", "-c", s]) for s in scripts]
      codes = [proc.wait() for proc in procs]
      for i, code in enumerate(codes):
        print(f"tpu_vm: process {i} exited with status {code}", file=sys.stderr)
      return max(codes, key=abs)
    if not (opts.tpu and opts.zone):
      raise CommandError("--tpu and --zone are required (or --local_processes)")
    commands = tpu_commands(opts, train)
  except CommandError as e:
    print(f"tpu_vm: {e}", file=sys.stderr)
    return 2
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not opts.dry_run:
      subprocess.run(cmd, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
