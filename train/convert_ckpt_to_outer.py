"""Convert a per-expert MoE checkpoint to the fused layout transformers 5 loads directly
(the Hy3 seed's `convert_ckpt_to_outer.py`, for every profile in train/moe_layout.py).

    python -m train.convert_ckpt_to_outer --input_dir IN --output_dir OUT [--workers 8]

Steps: (1) pre-scan the index: group every per-expert key by its MoE block, note the groups
that span shards, and check every group is complete (each expert 0..E-1 has gate, up and down
of the right shapes; E from config.json) before anything is written; (2) convert shard by
shard in parallel (key renames, same-shard groups fused); (3) a cross-shard group is gathered
by the worker of its first shard (sorted) and written there, so no shard is re-saved and none
is left empty (a shard that would be empty is not written); (4) copy config.json, tokenizer
and every other non-weight file and folder; (5) rebuild model.safetensors.index.json from
what was written. Memory: one shard (plus the groups it owns) per worker; tensors are read
one at a time through safetensors' lazy `safe_open`. On an already-fused checkpoint it is a
copy. Exit 0 done, 1 bad input, 2 usage.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections import defaultdict
import multiprocessing
from pathlib import Path

from .moe_layout import EXPERT_ROLES, expert_width, fuse, num_experts, profile_for
from stages.strict_cli import StrictParser

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ConvertError(Exception):
    """Bad input checkpoint (exit 1)."""


def _headers(path: Path) -> dict:
    """{key: (dtype, shape)} from a safetensors header (no tensor data read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in head.items()}


def read_layout(inp: Path) -> tuple[dict, dict]:
    """(config, weight_map {key: file}); every file named is read for its real keys."""
    cfg_path = inp / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{inp}: no config.json")
    try:
        config = json.loads(cfg_path.read_text("utf-8"))
    except ValueError as e:
        raise ConvertError(f"{cfg_path}: not JSON ({e})") from None
    if (inp / INDEX).is_file():
        try:
            files = sorted(set(json.loads((inp / INDEX).read_text("utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ConvertError(f"{inp / INDEX}: no readable weight_map ({e})") from None
    elif (inp / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise ConvertError(f"{inp}: neither {INDEX} nor {SINGLE}")
    weight_map = {}
    for name in files:
        if not (inp / name).is_file():
            raise ConvertError(f"{inp / INDEX}: names {name}, which does not exist")
        try:
            keys = _headers(inp / name)
        except (OSError, ValueError) as e:
            raise ConvertError(f"{inp / name}: not a safetensors file ({e})") from None
        for k in keys:  # the loader reads every tensor of every file the index names
            weight_map[k] = name
    return config, weight_map


def scan(inp: Path, config: dict, weight_map: dict, profile) -> dict:
    """Step 1: {group prefix: {"files": sorted files, "experts": {(e, role): (file, key)}}},
    each checked complete and well-shaped."""
    groups: dict = defaultdict(lambda: {"files": set(), "experts": {}})
    for key, f in weight_map.items():
        hit = profile.expert(profile.rename(key))
        if hit:
            prefix, e, role = hit
            groups[prefix]["files"].add(f)
            groups[prefix]["experts"][(e, role)] = (f, key)
    if not groups:
        return {}
    E = num_experts(config)
    width, hidden = expert_width(config), config.get("hidden_size")
    headers = {f: _headers(inp / f) for f in {g for grp in groups.values() for g in grp["files"]}}
    for prefix, g in sorted(groups.items()):
        n = E if E is not None else max(e for e, _ in g["experts"]) + 1
        extra = sorted(e for e, _ in g["experts"] if e >= n)
        if extra:
            raise ConvertError(f"{prefix}{extra[0]}: expert index beyond config.json's {n} experts")
        for e in range(n):
            for role in EXPERT_ROLES:
                if (e, role) not in g["experts"]:
                    proj = next(p for p, r in profile.projs.items() if r == role)
                    raise ConvertError(f"missing expert {e} {proj} of {prefix} (config.json: {n} experts); "
                                       f"nothing written")
                f, key = g["experts"][(e, role)]
                shape = headers[f][key][1]
                want = (width, hidden) if role != "down" else (hidden, width)
                if width and hidden and shape != want:
                    raise ConvertError(f"{f}: {key} has shape {list(shape)}, expected {list(want)} "
                                       f"(hidden_size {hidden}, expert width {width}); nothing written")
        g["n"] = n
        g["files"] = sorted(g["files"])
    return dict(groups)


def convert_shard(job: tuple) -> dict:
    """Step 2/3 for one shard: its renamed keys, its same-shard groups and the cross-shard groups
    it owns, fused. Returns {key: (file, nbytes, numel)} of what it wrote."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    inp, out, name, profile, groups = job
    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)  # one shard per core: no thread oversubscription
    inp, out = Path(inp), Path(out)
    tensors = {}
    with safe_open(str(inp / name), framework="pt") as f:
        for key in f.keys():
            if not profile.expert(profile.rename(key)):
                tensors[profile.rename(key)] = f.get_tensor(key)
    handles = {}
    try:
        for prefix, g in groups.items():  # groups owned by this shard (first file in sort order)
            parts = {r: [] for r in EXPERT_ROLES}
            for e in range(g["n"]):
                for role in EXPERT_ROLES:
                    f_name, key = g["experts"][(e, role)]
                    if f_name not in handles:
                        handles[f_name] = safe_open(str(inp / f_name), framework="pt")
                    parts[role].append(handles[f_name].get_tensor(key))
            tensors[prefix + "gate_up_proj"], tensors[prefix + "down_proj"] = fuse(
                parts["gate"], parts["up"], parts["down"])
            del parts
    finally:
        handles.clear()
    if not tensors:
        return {}
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    return {k: (name, t.numel() * t.element_size(), t.numel()) for k, t in tensors.items()}


def convert(input_dir: str, output_dir: str, workers: int = 8, profile_name: str = "auto",
            log=print) -> Path:
    inp, out = Path(input_dir), Path(output_dir)
    if not inp.is_dir():
        raise ConvertError(f"--input_dir {inp}: no such directory")
    if out.exists() and inp.resolve() == out.resolve():
        raise ConvertError("--output_dir must differ from --input_dir")
    if out.exists() and any(out.glob("*.safetensors")):
        raise ConvertError(f"--output_dir {out} already holds *.safetensors files: give an empty or new dir")
    config, weight_map = read_layout(inp)
    profile = profile_for(config, profile_name)
    groups = scan(inp, config, weight_map, profile)
    cross = {p: g for p, g in groups.items() if len(g["files"]) > 1}
    log(f"{inp}: {len(set(weight_map.values()))} shards, {len(weight_map)} tensors, profile {profile.name}, "
        f"{len(groups)} expert groups ({len(cross)} across shards)")
    if not groups:
        log("no per-expert key: the checkpoint is already fused; copying it")
    out.mkdir(parents=True, exist_ok=True)
    owned = defaultdict(dict)
    for prefix, g in groups.items():
        owned[g["files"][0]][prefix] = g
    jobs = [(str(inp), str(out), name, profile, owned.get(name, {})) for name in sorted(set(weight_map.values()))]
    written: dict = {}
    if workers > 1 and len(jobs) > 1:
        # fork after importing (not running) torch: workers share the import (seconds each otherwise)
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for part in pool.imap_unordered(convert_shard, jobs):
                written.update(part)
    else:
        for job in jobs:
            written.update(convert_shard(job))
    _copy_other_files(inp, out)
    files = sorted({v[0] for v in written.values()})
    if files == [SINGLE] and not (inp / INDEX).is_file():
        pass  # a single-file checkpoint stays one
    else:
        index = {"metadata": {"total_size": sum(v[1] for v in written.values()),
                              "total_parameters": sum(v[2] for v in written.values())},
                 "weight_map": {k: written[k][0] for k in sorted(written)}}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    log(f"{out}: {len(files)} shards, {len(written)} tensors")
    return out


def _copy_other_files(inp: Path, out: Path) -> None:
    """Step 4: config, tokenizer, custom code and anything else (dirs too), unchanged."""
    for p in sorted(inp.iterdir()):
        if p.name == INDEX or p.name.endswith(".safetensors"):
            continue
        if p.is_dir():
            shutil.copytree(p, out / p.name, dirs_exist_ok=True)
        else:
            shutil.copy2(p, out / p.name)


def parse_args(argv=None):
    p = StrictParser(prog="python -m train.convert_ckpt_to_outer",
                     description="Fuse a per-expert MoE checkpoint into transformers 5's "
                                 "[E, 2I, H] gate_up_proj / [E, H, I] down_proj layout.")
    p.add_argument("--input_dir", required=True, help="HF model dir with per-expert weights")
    p.add_argument("--output_dir", required=True, help="new dir for the converted model")
    p.add_argument("--workers", type=int, default=8, help="shards converted in parallel (default: 8)")
    p.add_argument("--profile", default="auto", choices=["auto", "qwen2_moe", "hy_v3", "mixtral", "phimoe"],
                   help="key layout; auto: from config.json's model_type (default: auto)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        convert(args.input_dir, args.output_dir, args.workers, args.profile)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
