"""Check a fused (converted) MoE checkpoint before training on it (the Hy3 seed's
`check_converted.py`, for every model type transformers 5 knows).

    python -m train.check_converted DIR [--spot-check 3]

Checks: (1) config.json is complete: transformers builds the model from it (on the meta device,
no memory) and it names the expert count, width and hidden size; (2) the index has
metadata.total_size and a non-empty weight_map; (3) every key the model holds is present
(expected keys come from that meta model: the fused `gate_up_proj`/`down_proj` per MoE block),
plus the multi-token-prediction layers `num_hidden_layers .. +num_nextn_predict_layers-1`
(a MoE layer's keys and eh_proj/enorm/hnorm, Hy3 also final_layernorm); a left-over per-expert
key is an error, any other unknown key a warning; every tensor's shape is the model's (headers
only); (4) every shard the index names exists, is non-empty and holds exactly the keys the
index gives it (transformers loads every tensor of a named file); an unreferenced *.safetensors
is a warning when it is an empty residue (no tensor), else an error; (5) spot-check: the
first N shards holding expert tensors are read: gate_up/down shapes [E, 2I, H] / [E, H, I],
no NaN/Inf; dtypes are reported. Exit 0 PASS, 1 FAIL, 2 usage.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from .convert_ckpt_to_outer import INDEX, SINGLE, _headers
from .moe_layout import ANY_EXPERT_RE, expert_width, mtp_layers, num_experts
from stages.strict_cli import StrictParser

EMPTY_RESIDUE_BYTES = 128
MTP_EXTRAS = {"hy_v3": ("eh_proj.weight", "enorm.weight", "hnorm.weight", "final_layernorm.weight")}
MTP_EXTRAS_DEFAULT = ("eh_proj.weight", "enorm.weight", "hnorm.weight")


class Report:
    def __init__(self, out=print):
        self.errors, self.warnings, self.out = [], [], out

    def error(self, msg):
        self.errors.append(msg)
        self.out(f"error: {msg}")

    def warn(self, msg):
        self.warnings.append(msg)
        self.out(f"warning: {msg}")


def expected_tensors(config_path: Path, trust_remote_code: bool = False) -> dict:
    """{key: shape} the model holds at run time (tied weights once), from a meta-device build."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(config_path.parent), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    seen, shapes = set(), {}
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied weight is saved once
            continue
        seen.add(id(t))
        shapes[k] = tuple(t.shape)
    return shapes


def _mtp_expected(expected: dict, config: dict) -> dict:
    """MTP layers: the last MoE layer's keys renumbered, plus the MTP extras (shapes unchecked)."""
    n = int(config.get("num_hidden_layers") or 0)
    layers = mtp_layers(config)
    if not layers or n == 0:
        return {}
    src = f"model.layers.{n - 1}."
    out = {}
    for L in layers:
        for k, shape in expected.items():
            if k.startswith(src):
                out[f"model.layers.{L}." + k[len(src):]] = shape
        for suffix in MTP_EXTRAS.get(config.get("model_type"), MTP_EXTRAS_DEFAULT):
            out[f"model.layers.{L}.{suffix}"] = None
    return out


def check(path: str, spot_check: int = 3, trust_remote_code: bool = False, out=print) -> Report:
    d, r = Path(path), Report(out)
    # (1) config
    if not (d / "config.json").is_file():
        r.error(f"{d}: no config.json")
        return r
    try:
        config = json.loads((d / "config.json").read_text("utf-8"))
    except ValueError as e:
        r.error(f"{d / 'config.json'}: not JSON ({e})")
        return r
    E, width, hidden = num_experts(config), expert_width(config), config.get("hidden_size")
    for what, v in (("num_experts (or n_routed_experts / num_local_experts)", E),
                    ("moe_intermediate_size (or expert_hidden_dim / intermediate_size)", width),
                    ("hidden_size", hidden), ("num_hidden_layers", config.get("num_hidden_layers"))):
        if v is None:
            r.error(f"{d / 'config.json'}: no {what}")
    try:
        expected = expected_tensors(d / "config.json", trust_remote_code)
    except Exception as e:
        hint = " (pass --trust_remote_code)" if "trust_remote_code" in str(e) else ""
        r.error(f"{d / 'config.json'}: transformers cannot build the model from it: "
                f"{' '.join(str(e).split())[:300]}{hint}")
        return r
    expected.update(_mtp_expected(expected, config))
    # (2) index
    if (d / INDEX).is_file():
        try:
            index = json.loads((d / INDEX).read_text("utf-8"))
            weight_map = index["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            r.error(f"{d / INDEX}: unreadable ({e})")
            return r
        if not isinstance(index.get("metadata"), dict) or "total_size" not in index["metadata"]:
            r.error(f"{d / INDEX}: no metadata.total_size")
        if not weight_map:
            r.error(f"{d / INDEX}: empty weight_map")
    elif (d / SINGLE).is_file():
        weight_map = {k: SINGLE for k in _safe_headers(d / SINGLE, r)}
    else:
        r.error(f"{d}: neither {INDEX} nor {SINGLE}")
        return r
    # (4) shards present, non-empty, holding what the index says
    found = {}
    for name in sorted(set(weight_map.values())):
        f = d / name
        if not f.is_file():
            r.error(f"{f}: named by the index, missing")
            continue
        if f.stat().st_size == 0:
            r.error(f"{f}: empty file")
            continue
        heads = _safe_headers(f, r)
        if heads is None:
            continue
        for k, v in heads.items():
            found[k] = (name, *v)
            if weight_map.get(k) != name:
                r.error(f"{f}: holds {k}, which the index does not give to it (it would be loaded anyway)")
        for k in (k for k, v in weight_map.items() if v == name and k not in heads):
            r.error(f"{f}: the index names {k} here; not in the file")
    for f in sorted(set(d.glob("*.safetensors")) - {d / n for n in weight_map.values()}):
        size = f.stat().st_size
        try:
            empty = not _headers(f)
        except (OSError, ValueError, KeyError):
            empty = size <= EMPTY_RESIDUE_BYTES
        if empty:
            r.warn(f"{f}: unreferenced empty residue ({size} bytes, no tensor), safe to delete")
        else:
            r.error(f"{f}: a {size}-byte shard the index does not name")
    # (3) expected keys and shapes
    leftovers = sorted(k for k in found if ANY_EXPERT_RE.search(k))
    for k in leftovers[:5]:
        r.error(f"{found[k][0]}: per-expert key {k} left over (not converted)")
    if len(leftovers) > 5:
        r.error(f"... and {len(leftovers) - 5} more per-expert keys")
    missing = [k for k in expected if k not in found]
    for k in missing[:10]:
        r.error(f"missing {k}")
    if len(missing) > 10:
        r.error(f"... and {len(missing) - 10} more missing keys")
    for k, (name, dtype, shape) in sorted(found.items()):
        if k in expected and expected[k] is not None and tuple(expected[k]) != shape:
            r.error(f"{name}: {k} has shape {list(shape)}, the model's is {list(expected[k])}")
        elif k not in expected and k not in leftovers:
            r.warn(f"{name}: {k} is not a key of the model (ignored by transformers)")
    # (5) spot-check
    _spot_check(d, found, spot_check, E, width, hidden, r)
    dtypes = Counter(dtype for _, dtype, _ in found.values())
    out(f"{d}: {len(found)} tensors in {len(set(v[0] for v in found.values()))} shards, "
        f"dtypes {dict(sorted(dtypes.items()))}")
    return r


def _safe_headers(f: Path, r: Report):
    try:
        return _headers(f)
    except (OSError, ValueError, KeyError) as e:
        r.error(f"{f}: not a safetensors file ({e})")
        return None


def _spot_check(d: Path, found: dict, n: int, E, width, hidden, r: Report) -> None:
    import torch
    from safetensors import safe_open
    with_experts = sorted({v[0] for k, v in found.items() if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))})
    for name in with_experts[:n]:
        with safe_open(str(d / name), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if k.endswith(".experts.gate_up_proj") and None not in (E, width, hidden) \
                        and tuple(t.shape) != (E, 2 * width, hidden):
                    r.error(f"{name}: {k} has shape {list(t.shape)}, expected [{E}, {2 * width}, {hidden}]")
                if k.endswith(".experts.down_proj") and None not in (E, width, hidden) \
                        and tuple(t.shape) != (E, hidden, width):
                    r.error(f"{name}: {k} has shape {list(t.shape)}, expected [{E}, {hidden}, {width}]")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    r.error(f"{name}: {k} holds NaN or Inf")
        r.out(f"spot-checked {name}")


def main(argv=None) -> int:
    p = StrictParser(prog="python -m train.check_converted",
                     description="Check a fused MoE checkpoint (exit 0 PASS, 1 FAIL).")
    p.add_argument("dir", help="converted model dir")
    p.add_argument("--spot-check", "--spot_check", dest="spot_check", type=int, default=3,
                   help="read this many shards holding expert tensors in full (default: 3)")
    p.add_argument("--trust_remote_code", action="store_true", help="config.json needs custom code")
    args = p.parse_args(argv)
    r = check(args.dir, args.spot_check, args.trust_remote_code)
    if r.errors:
        print(f"FAIL: {len(r.errors)} errors, {len(r.warnings)} warnings")
        return 1
    print(f"PASS ({len(r.warnings)} warnings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
