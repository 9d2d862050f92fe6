"""Model-side pieces: per-document attention on packed rows, targets, LoRA, freezing, MoE
leaf modules, embedding resize."""
import argparse

import pytest
import torch

from test_train_helpers import TINY

from train.model import (IGNORE, apply_lora, find_moe_classes, freeze_all_but_attention,
                         loss_sum, mark_moe_leaf_modules, model_inputs, resize_embeddings,
                         shift_labels)


def tiny_model(**over):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = {**TINY, **over}
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    cfg.use_cache = False
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def packed_row(docs, seq_len):
    ids = torch.cat(docs)
    pos = torch.cat([torch.arange(len(d)) for d in docs])
    pad = seq_len - len(ids)
    ids = torch.cat([ids, torch.zeros(pad, dtype=torch.long)])
    pos = torch.cat([pos, torch.arange(pad)])  # padding is a segment of its own (as the stream does)
    return ids, pos


@torch.no_grad()
def test_packed_rows_attend_per_document_with_sdpa():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 6000, (n,), generator=g) for n in (5, 9, 4, 7, 3)]
    rows = [packed_row(docs[:3], 24), packed_row(docs[3:], 24)]  # batch of 2 packed rows
    batch = {"input_ids": torch.stack([r[0] for r in rows]), "position_ids": torch.stack([r[1] for r in rows])}
    packed = model(**model_inputs(batch, use_varlen=False)).logits
    starts = [0, 5, 14, 0, 7]
    for k, (doc, s) in enumerate(zip(docs, starts)):
        alone = model(input_ids=doc[None], use_cache=False).logits[0]
        torch.testing.assert_close(packed[0 if k < 3 else 1, s:s + len(doc)], alone, atol=1e-5, rtol=1e-5)
    # sanity: without the position reset the later documents see the earlier ones
    plain = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert not torch.allclose(plain[0, 5:14], packed[0, 5:14], atol=1e-3)


def test_targets_shift_and_never_cross_documents():
    ids = torch.tensor([[10, 11, 12, 20, 21, 0]])
    labels = torch.tensor([[IGNORE, 11, 12, 20, 21, IGNORE]])  # a stream that labels doc 2's first token
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    t = shift_labels({"input_ids": ids, "labels": labels, "position_ids": pos})
    assert t.tolist() == [[11, 12, IGNORE, 21, IGNORE, IGNORE]]
    # padded batches (no position_ids): plain HF shift
    t = shift_labels({"input_ids": ids, "labels": labels})
    assert t.tolist() == [[11, 12, 20, 21, IGNORE, IGNORE]]


def test_loss_sum_is_the_summed_token_cross_entropy():
    model = tiny_model()
    ids = torch.randint(3, 6000, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(8).expand(2, 8)}
    loss, n = loss_sum(model, batch)
    assert n == 2 * 5
    ref = model(input_ids=ids, labels=labels, use_cache=False).loss  # HF's own mean
    torch.testing.assert_close(loss / n, ref, atol=1e-5, rtol=1e-5)


def lora_args(**kw):
    base = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                lora_target_modules="q_proj,k_proj,v_proj,o_proj", modules_to_save=None)
    return argparse.Namespace(**{**base, **kw})


def test_lora_defaults_to_attention_projections_and_modules_to_save():
    model = apply_lora(tiny_model(), lora_args(modules_to_save="lm_head"), resized=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"{proj}.lora_A" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_lora_unknown_target_is_a_clear_error():
    from train.args import TrainError
    with pytest.raises(TrainError, match="no module named wq"):
        apply_lora(tiny_model(), lora_args(lora_target_modules="wq"), resized=False)


def test_resize_grows_embeddings_and_lora_then_saves_them():
    model = tiny_model(vocab_size=5000)
    assert resize_embeddings(model, 6000)
    assert model.get_input_embeddings().weight.shape[0] == 6000
    assert model.get_output_embeddings().weight.shape[0] == 6000
    assert not resize_embeddings(model, 5990)  # never shrinks
    peft_model = apply_lora(model, lora_args(), resized=True)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)


def test_train_attention_params_only():
    model = tiny_model()
    freeze_all_but_attention(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("self_attn" in n for n in trainable)
    assert not model.model.embed_tokens.weight.requires_grad


def test_moe_blocks_become_zero3_leaf_modules():
    from deepspeed.utils import z3_leaf_module
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig
    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg)
    classes = find_moe_classes(model)
    assert [c.__name__ for c in classes] == ["Qwen2MoeSparseMoeBlock"]
    mark_moe_leaf_modules(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen2MoeSparseMoeBlock"]
    assert len(blocks) == 2 and all(z3_leaf_module(b) for b in blocks)
    assert not z3_leaf_module(model.model.layers[0].self_attn)
    # explicit class names; an unknown one is an error
    assert find_moe_classes(model, "Qwen2MoeSparseMoeBlock") == classes
    from train.args import TrainError
    with pytest.raises(TrainError, match="HunYuanMoE"):
        find_moe_classes(model, "HunYuanMoE")
