"""The LM head at trained positions only (train/head_loss.py) gives the losses and gradients of
full-vocabulary logits + cross-entropy, computed here independently with the model's own
`.logits` and `F.cross_entropy`, chunked or not, packed or padded, LoRA or not; a model that
changes its logits after the head keeps the full path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Gemma2Config, Qwen2Config  # noqa: E402

from train import head_loss  # noqa: E402
from train.model import loss_sum, model_inputs, shift_labels  # noqa: E402

IGNORE = -100
VOCAB = 3001


def tiny_qwen(tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def packed_batch(seed: int = 1) -> dict:
    """2 packed rows of 3 documents each, prompts untrained, as train/packing.py lays them out."""
    g = torch.Generator().manual_seed(seed)
    B, L = 2, 48
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    pos = torch.cat([torch.arange(n) for n in (20, 16, 12)]).repeat(B, 1)
    labels = ids.clone()
    for start, n, prompt in ((0, 20, 8), (20, 16, 5), (36, 12, 4)):
        labels[:, start:start + prompt] = IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def reference(model, batch):
    """Full logits, the old way: per-token CE at every position, 0 where untrained."""
    target = shift_labels(batch)
    logits = model(**model_inputs(batch, False)).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE, reduction="none").view(target.shape)


def losses_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    losses = fn(model, batch)
    (losses.sum() * 0.37).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses.detach(), grads


def ours(model, batch):
    per_token, _ = loss_sum(model, batch, per_token=True)
    return per_token


@pytest.mark.parametrize("chunk_bytes", [head_loss.CHUNK_BYTES, 4 * VOCAB * 7])  # one chunk / chunks of 7
@pytest.mark.parametrize("tie", [True, False])
def test_trained_positions_equal_full_logits(monkeypatch, chunk_bytes, tie):
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", chunk_bytes)
    batch = packed_batch()
    ref_model, our_model = tiny_qwen(tie), tiny_qwen(tie)
    want, want_g = losses_and_grads(ref_model, reference, batch)
    got, got_g = losses_and_grads(our_model, ours, batch)
    assert head_loss.trained_position_head(our_model) is not None
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    assert (got[shift_labels(batch) == IGNORE] == 0).all()
    assert want_g.keys() == got_g.keys()
    for name in want_g:
        assert torch.allclose(got_g[name], want_g[name], atol=1e-6, rtol=1e-5), name


def test_padded_batch_and_nothing_trained():
    model, ref = tiny_qwen(), tiny_qwen()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    batch["labels"][1, 6:] = IGNORE
    batch["attention_mask"][1, 6:] = 0
    got, _ = losses_and_grads(model, ours, batch)
    want, _ = losses_and_grads(ref, reference, batch)
    assert torch.allclose(got, want, atol=1e-6)
    # a dummy batch (a rank whose data ran out): zero loss, but the head still gets a gradient,
    # so every rank's backward reaches the same parameters
    batch["labels"][:] = IGNORE
    got, grads = losses_and_grads(model, ours, batch)
    assert (got == 0).all()
    assert "lm_head.weight" in grads or "model.embed_tokens.weight" in grads
    assert all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_model(monkeypatch, targets):
    """LoRA on attention (the head stays a Linear: gradients in the forward pass) and on the
    head itself (a LoRA layer: chunks under activation checkpointing, recomputed in backward)."""
    peft = pytest.importorskip("peft")
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * VOCAB * 7)
    batch = packed_batch(5)

    def lora(seed):
        m = tiny_qwen(tie=False, seed=seed)
        torch.manual_seed(9)
        return peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))
    want, want_g = losses_and_grads(lora(0), reference, batch)
    got, got_g = losses_and_grads(lora(0), ours, batch)
    assert torch.allclose(got, want, atol=1e-6)
    assert want_g.keys() == got_g.keys() and len(got_g) == {"v_proj": 8, "lm_head": 6}[targets[1]]  # A, B per layer
    for name in want_g:
        assert torch.allclose(got_g[name], want_g[name], atol=1e-6, rtol=1e-5), name


def test_model_that_changes_logits_keeps_full_path(caplog):
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with caplog.at_level("INFO", logger="train"):
        assert head_loss.trained_position_head(model) is None
    assert "changes the logits" in caplog.text
    batch = packed_batch()
    del batch["position_ids"]
    got, _ = losses_and_grads(model, ours, batch)
    want, _ = losses_and_grads(model, reference, batch)
    assert torch.allclose(got, want, atol=1e-6)
