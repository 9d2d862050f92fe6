"""`python -m train.launch [--dry-run] [--hostfile F] [--master_port N] TRAIN ARGS...`: launch
like the seed scripts, from their environment variables.

* `HOST_GPU_NUM` — GPUs per node (both seeds).
* `IP_LIST="ip1,ip2"` (Hy3 train.sh) — every node gets HOST_GPU_NUM slots; or
  `NODE_IP_LIST="ip1:8,ip2:8"` (Hunyuan train.sh) — each node's own slot count (HOST_GPU_NUM
  for an entry without one). `LOCAL_IP` (Hunyuan) is the master address; default: the first node.

Writes the DeepSpeed hostfile (`ip slots=N` per line) and runs
`deepspeed --hostfile F --master_addr IP --master_port N --module train TRAIN ARGS...` on
this node (DeepSpeed's launcher reaches the others over ssh/pdsh, as the seeds do; with one
node it runs locally). The train arguments are checked first (flags or CONFIG.yaml, as
`python -m train` takes them), so a typo fails here, not on every node. `--dry-run` prints the
hostfile and the command and writes nothing. A missing or inconsistent variable is one
`error:` line (exit 2).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

from stages.strict_cli import StrictParser

OWN_FLAGS = {"--dry-run": 0, "--hostfile": 1, "--master_port": 1, "-h": 0, "--help": 0}


class LaunchError(Exception):
    pass


def _count(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise LaunchError(f"{name}={value!r}: expected a GPU count >= 1")
    return n


def hosts_from_env(env) -> tuple[list[tuple[str, int]], str]:
    """-> ([(ip, slots)], master address) from HOST_GPU_NUM with IP_LIST or NODE_IP_LIST."""
    gpus = env.get("HOST_GPU_NUM")
    if not gpus:
        raise LaunchError("HOST_GPU_NUM is not set: export HOST_GPU_NUM=<GPUs per node> (as the seed's train.sh)")
    per_node = _count("HOST_GPU_NUM", gpus)
    ip_list, node_list = env.get("IP_LIST", "").strip(), env.get("NODE_IP_LIST", "").strip()
    if not ip_list and not node_list:
        raise LaunchError('give the nodes: export IP_LIST="ip1,ip2" (Hy3) or NODE_IP_LIST="ip1:8,ip2:8" (Hunyuan)')
    hosts: list[tuple[str, int]] = []
    if node_list:
        for item in node_list.split(","):
            ip, _, slots = item.strip().partition(":")
            if not ip:
                raise LaunchError(f"NODE_IP_LIST={node_list!r}: empty entry")
            hosts.append((ip, _count(f"NODE_IP_LIST entry {item.strip()}", slots) if slots else per_node))
        if ip_list and [h for h, _ in hosts] != [ip.strip() for ip in ip_list.split(",")]:
            raise LaunchError(f"IP_LIST={ip_list!r} and NODE_IP_LIST={node_list!r} name different nodes: give one")
    else:
        for ip in ip_list.split(","):
            if not ip.strip():
                raise LaunchError(f"IP_LIST={ip_list!r}: empty entry")
            hosts.append((ip.strip(), per_node))
    names = [h for h, _ in hosts]
    if len(set(names)) != len(names):
        raise LaunchError(f"a node is listed twice in {'NODE_IP_LIST' if node_list else 'IP_LIST'}: {', '.join(names)}")
    master = env.get("LOCAL_IP", "").strip() or names[0]
    if master not in names:
        raise LaunchError(f"LOCAL_IP={master} is not one of the nodes ({', '.join(names)})")
    return hosts, master


def hostfile_text(hosts: list[tuple[str, int]]) -> str:
    return "".join(f"{ip} slots={n}\n" for ip, n in hosts)


def command(hostfile: str, master: str, port: int, train_args: list[str]) -> list[str]:
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [launcher, "--hostfile", hostfile, "--master_addr", master, "--master_port", str(port),
            "--module", "train", *train_args]


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading launch flags, then everything for python -m train (`--` may separate them)."""
    own, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return own, argv[i + 1:]
        name = a.split("=", 1)[0]
        if name not in OWN_FLAGS:
            break
        take = 0 if "=" in a else OWN_FLAGS[name]
        own += argv[i:i + 1 + take]
        i += 1 + take
    return own, argv[i:]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = _split(argv)
    p = StrictParser(prog="python -m train.launch", usage="python -m train.launch [--dry-run] [--hostfile F] "
                     "[--master_port N] TRAIN ARGS...", description=__doc__.split("\n\n")[1].strip(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the hostfile and the command; write and run nothing")
    p.add_argument("--hostfile", default="hostfile", help="where the DeepSpeed hostfile is written (default: hostfile)")
    p.add_argument("--master_port", type=int, default=29500, help="(default: 29500)")
    args = p.parse_args(own)
    if not train_args:
        p.error("give the training arguments, as python -m train takes them (flags or CONFIG.yaml key=value ...)")
    from train.args import parse_args
    parse_args(train_args)  # bad training flags: exit 2 here, before any node starts
    try:
        hosts, master = hosts_from_env(os.environ)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = command(args.hostfile, master, args.master_port, train_args)
    text = hostfile_text(hosts)
    if args.dry_run:
        print(f"# hostfile {args.hostfile} ({len(hosts)} nodes, {sum(n for _, n in hosts)} GPUs)")
        print(text, end="")
        print("# command")
        print(shlex.join(cmd))
        return 0
    with open(args.hostfile, "w") as f:
        f.write(text)
    print(f"hostfile {args.hostfile}: {len(hosts)} nodes; running {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
