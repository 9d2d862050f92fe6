"""Routed-expert checkpoint layouts: per-expert ("inner", hub) keys -> the fused ("outer")
layout transformers 5 holds at run time. Shared by train/convert_ckpt_to_outer.py (writes it)
and train/check_converted.py (checks it).

The contract, per MoE block prefix P (`model.layers.L.mlp.experts.`), E experts, expert width I,
hidden size H (the nn.Linear [out, in] orientation, as transformers' `conversion_mapping.py`
`MergeModulelist(dim=0)` + `Concatenate(dim=1)` produce it):
    P + "gate_up_proj" = stack_e(cat(gate[e], up[e]))   [E, 2I, H]   (gate rows first, not interleaved)
    P + "down_proj"    = stack_e(down[e])               [E, H, I]
dtype kept, no `.weight` suffix. Profiles are transformers 5's recipes:
    qwen2_moe  `mlp.experts.{e}.{gate,up,down}_proj.weight` (qwen2/3_moe, olmoe, deepseek_v2/3,
               glm4_moe, hunyuan_v1_moe, ... every model type without its own recipe)
    hy_v3      the same + renames `mlp.router.gate.`->`mlp.gate.`, `mlp.expert_bias`->
               `mlp.e_score_correction_bias`, `mlp.shared_mlp.`->`mlp.shared_experts.`
               (and `mlp.gate.wg.`->`mlp.gate.` for older checkpoints)
    mixtral    `.block_sparse_moe.`->`.mlp.`, experts `w1` (gate), `w3` (up), `w2` (down)
               (mixtral, minimax, minimax_m2; phimoe also `.gate.weight`->`.router.weight`)
Already-fused checkpoints (gpt_oss, a converted one) have no per-expert key: nothing to do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

EXPERT_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class Profile:
    name: str
    projs: dict  # checkpoint projection name -> role ("gate" | "up" | "down")
    renames: tuple = ()  # (old substring, new) applied in order to every key, before expert matching
    expert_re: re.Pattern = field(default=None)

    def rename(self, key: str) -> str:
        for old, new in self.renames:
            key = key.replace(old, new)
        return key

    def expert(self, key: str):
        """(group prefix, expert index, role) of a renamed per-expert key, else None."""
        m = self.expert_re.match(key)
        return (m.group(1), int(m.group(2)), self.projs[m.group(3)]) if m else None


def _profile(name, projs, renames=()):
    alt = "|".join(projs)
    return Profile(name, projs, tuple(renames), re.compile(rf"^(.*\.experts\.)(\d+)\.({alt})\.weight$"))


QWEN2_MOE = _profile("qwen2_moe", {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"})
HY_V3 = _profile("hy_v3", QWEN2_MOE.projs, [("mlp.router.gate.", "mlp.gate."),
                                            ("mlp.gate.wg.", "mlp.gate."),
                                            ("mlp.expert_bias", "mlp.e_score_correction_bias"),
                                            ("mlp.shared_mlp.", "mlp.shared_experts.")])
MIXTRAL = _profile("mixtral", {"w1": "gate", "w3": "up", "w2": "down"}, [(".block_sparse_moe.", ".mlp.")])
PHIMOE = _profile("phimoe", MIXTRAL.projs, [(".block_sparse_moe.", ".mlp."), (".gate.weight", ".router.weight")])
PROFILES = {p.name: p for p in (QWEN2_MOE, HY_V3, MIXTRAL, PHIMOE)}
_BY_MODEL_TYPE = {"hy_v3": HY_V3, "mixtral": MIXTRAL, "minimax": MIXTRAL, "minimax_m2": MIXTRAL, "phimoe": PHIMOE}
# Any per-expert key, whatever the profile: a fused checkpoint must hold none.
ANY_EXPERT_RE = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def profile_for(config: dict, name: str = "auto") -> Profile:
    if name != "auto":
        return PROFILES[name]
    return _BY_MODEL_TYPE.get(config.get("model_type"), QWEN2_MOE)


def _first_int(config: dict, keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def num_experts(config: dict) -> int | None:
    return _first_int(config, ("num_experts", "n_routed_experts", "num_local_experts"))


def expert_width(config: dict) -> int | None:
    """I of one routed expert (Hy3 also writes it as expert_hidden_dim)."""
    return _first_int(config, ("moe_intermediate_size", "expert_hidden_dim", "intermediate_size"))


def fuse(gate: list, up: list, down: list):
    """The fused pair from per-expert lists (index = expert)."""
    import torch
    gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gate, up)], dim=0).contiguous()
    return gate_up, torch.stack(down, dim=0).contiguous()


def mtp_layers(config: dict) -> range:
    """Multi-token-prediction layers stored after the main ones (Hy3, DeepSeek-V3 style)."""
    n = int(config.get("num_hidden_layers") or 0)
    k = int(config.get("num_nextn_predict_layers") or config.get("num_mtp_layers") or 0)
    return range(n, n + k)
