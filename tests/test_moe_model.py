"""MoE models in the trainer: the final save keeps transformers 5's fused expert layout (not
the per-expert one save_pretrained writes by default), and --make_moe_param_leaf_module makes
every MoE block class a ZeRO-3 leaf."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.check_converted import main as check_main
from train.checkpoint import Checkpointer
from train.model import find_moe_classes, mark_moe_leaf_modules
from train.moe_layout import ANY_EXPERT_RE

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8)
MOE = {  # model_type -> (extra config, the MoE block class transformers 5 builds)
    "hy_v3": (dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2), "HYV3MoE"),
    "qwen2_moe": (dict(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                       num_experts_per_tok=2), "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": (dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2), "Qwen3MoeSparseMoeBlock"),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), "MixtralSparseMoeBlock"),
    "hunyuan_v1_moe": (dict(num_experts=4, moe_topk=2), "HunYuanMoEV1Moe"),
}


def tiny(model_type):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **MOE[model_type][0]})
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, .2) if p.dim() > 1 else p.normal_(1, .05)
    return m


@pytest.mark.parametrize("model_type", list(MOE))
def test_moe_blocks_are_zero3_leaves(model_type):
    from deepspeed.utils import z3_leaf_module
    model = tiny(model_type)
    name = MOE[model_type][1]
    assert [c.__name__ for c in find_moe_classes(model)] == [name]
    mark_moe_leaf_modules(model)
    blocks = [m for m in model.modules() if type(m).__name__ == name]
    assert blocks and all(z3_leaf_module(b) for b in blocks)
    assert not any(z3_leaf_module(m) for m in model.modules() if type(m).__name__ != name)


class _Engine:
    def __init__(self, module):
        self.module = module


def test_final_save_keeps_the_fused_layout(tmp_path, sample_tokenizer):
    from transformers import AutoTokenizer
    model = tiny("qwen3_moe")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    tok = AutoTokenizer.from_pretrained(sample_tokenizer)
    ck = Checkpointer(tmp_path, rank=0, world_size=1, save_total_limit=None, tokenizer=tok,
                      tokenizer_dir=sample_tokenizer)
    out = tmp_path / "final"
    ck.save_final(_Engine(model), out, is_lora=False, zero_stage=0)
    keys = set()
    for f in out.glob("*.safetensors"):
        keys |= set(load_file(str(f)))
    assert keys == set(model.state_dict())  # the run-time (fused) names, as transformers holds them
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and not any(ANY_EXPERT_RE.search(k) for k in keys)
    assert check_main([str(out)]) == 0
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert Path(out / "tokenizer.json").is_file()
