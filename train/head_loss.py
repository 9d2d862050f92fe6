"""The LM head and cross-entropy at trained positions only, in chunks.

A causal LM's forward ends with `logits = lm_head(hidden)`: [tokens, vocab] numbers, most of
them at positions nothing trains (the prompt of an SFT sample, packing padding). With a 151 k
vocabulary the head is a large share of a small model's FLOPs, and its fp32 logits are the
largest tensor of the step (5 GB at 8 k tokens). The data side knows which positions train
(`shift_labels(batch) != IGNORE`), so the loss step can do better than HF's full-vocabulary
logits:

* the head runs on the trained positions only, the per-token cross-entropy is scattered back
  into the [B, L] tensor train/loop.py attributes to datasets (0 where untrained);
* it runs in chunks of `CHUNK_BYTES` of fp32 logits, so no [tokens, vocab] logits tensor
  exists at once. For the usual head (an `nn.Linear`, tied or not) `LinearCrossEntropy`
  computes each chunk's gradients in the forward pass (as Liger-Kernel does): the head costs
  2 + 4 matmuls over trained positions only, nothing recomputed. Any other head (a LoRA layer on
  the head) runs each chunk under activation checkpointing (its logits recomputed in backward).

How it hooks in without changing the module tree (state-dict keys, ZeRO-3 partitions and
checkpoints stay as they are): the output embedding's `forward` is wrapped on the instance.
While a target is set, the wrapped forward receives the hidden states and returns the per-token
losses in place of the logits; ZeRO-3 still gathers the head's weight around that call (its
hooks sit on the module, not on `forward`). A model that changes logits after the head
(Gemma-2's soft-capping, Cohere's scale, …) would then get wrong losses, so before first use
a probe compares the two paths on a small fixed batch (eval mode, RNG untouched); a model that
differs keeps the full-logits path, with one log line saying so.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stages.constants import IGNORE

log = logging.getLogger("train")

CHUNK_BYTES = 1 << 28      # fp32 logits per chunk (256 MiB): 1,766 positions at a 152 k vocabulary
PROBE_ROWS, PROBE_LEN = 2, 16
PROBE_TOL = {torch.float32: 1e-4, torch.float64: 1e-6}  # half precisions: 2e-2 (GEMM tiling)


class TrainedPositionHead:
    """Wraps one model's output embedding; `target` set = return per-token losses."""

    def __init__(self, head: torch.nn.Module, vocab_size: int):
        self.head = head
        self.vocab = vocab_size
        self.forward = head.forward          # the module's own (LoRA, tied weights included)
        self.target: torch.Tensor | None = None
        head.forward = self._forward

    def _forward(self, hidden: torch.Tensor, *args, **kwargs):
        if self.target is None or args or kwargs:
            return self.forward(hidden, *args, **kwargs)
        return self.token_losses(hidden, self.target)

    def token_losses(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        B, L, H = hidden.shape
        flat_t = target.reshape(-1)
        idx = (flat_t != IGNORE).nonzero().squeeze(1)
        keep = 1.0
        if idx.numel() == 0:
            # nothing trains here (a dummy batch): still run the head once, weighted 0, so every
            # rank's backward reaches the same parameters (ZeRO reduces them collectively)
            idx, keep = torch.zeros(1, dtype=torch.long, device=hidden.device), 0.0
        h = hidden.reshape(B * L, H).index_select(0, idx)
        t = flat_t.index_select(0, idx).clamp_min(0)
        step = max(1, CHUNK_BYTES // (4 * self.vocab))
        if type(self.head) is torch.nn.Linear:  # the usual head (tied or not): grads in the forward pass
            losses = LinearCrossEntropy.apply(h, self.head.weight, self.head.bias, t, step, torch.is_grad_enabled())
        elif idx.numel() <= step:
            losses = _chunk_losses(self.forward, h, t)
        else:  # any other head (a LoRA-wrapped one): chunks recomputed in backward
            losses = torch.cat([checkpoint(_chunk_losses, self.forward, h[a:a + step], t[a:a + step],
                                           use_reentrant=False)
                                for a in range(0, idx.numel(), step)])
        out = hidden.new_zeros(B * L, dtype=torch.float32)
        return out.index_put((idx,), losses * keep).view(B, L)


def _chunk_losses(head_forward, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_forward(h).float(), t, reduction="none")


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `h @ W.T + b` in chunks, with the gradients computed chunk by
    chunk in the forward pass (as Liger-Kernel's fused linear cross-entropy): one chunk's fp32
    logits exist at a time, and nothing is recomputed. Backward scales them by the incoming
    per-token gradient; when that is not one value for every token (train/loop.py always
    backpropagates a scaled sum, so it is), the chunks are recomputed instead — exact either way."""

    @staticmethod
    def forward(ctx, h, weight, bias, t, step, want_grad):
        # the weight's gradient accumulates in its own dtype (fp32 for fp32 training; bf16 as
        # Liger does, each chunk's product summed in fp32 by the matmul)
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros_like(weight) if want_grad else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) \
            if want_grad and bias is not None else None
        for a in range(0, h.shape[0], step):
            hc, tc = h[a:a + step], t[a:a + step]
            logits = F.linear(hc, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            losses[a:a + step] = lse - logits.gather(1, tc[:, None]).squeeze(1)
            if want_grad:  # d loss_t / d logits = softmax - onehot, in place
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(tc), device=g.device), tc] -= 1.0
                grad_h[a:a + step] = (g @ weight.float()).to(h.dtype)
                grad_w.addmm_(g.t().to(weight.dtype), hc.to(weight.dtype))
                if grad_b is not None:
                    grad_b += g.sum(0)
        ctx.step = step
        ctx.save_for_backward(h, weight, bias, t, grad_h, grad_w, grad_b)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        h, weight, bias, t, grad_h, grad_w, grad_b = ctx.saved_tensors
        g0 = grad_losses[:1]
        if grad_h is not None and bool((grad_losses == g0).all()):
            s = g0.to(torch.float32)
            dh = grad_h * s.to(grad_h.dtype)
            dw = grad_w * s.to(grad_w.dtype)
            db = (grad_b * s).to(bias.dtype) if grad_b is not None else None
            return dh, dw, db, None, None, None
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if bias is not None else None
        step = ctx.step
        for a in range(0, h.shape[0], step):
            hc, tc = h[a:a + step], t[a:a + step]
            g = torch.softmax(F.linear(hc, weight, bias).float(), dim=-1)
            g[torch.arange(len(tc), device=g.device), tc] -= 1.0
            g *= grad_losses[a:a + step, None]
            dh[a:a + step] = (g @ weight.float()).to(h.dtype)
            dw.addmm_(g.t(), hc.float())
            if db is not None:
                db += g.sum(0)
        return dh, dw.to(weight.dtype), (db.to(bias.dtype) if db is not None else None), None, None, None


def trained_position_head(model) -> TrainedPositionHead | None:
    """The model's wrapped head, installed (and probed) on first use; None = full logits."""
    module = getattr(model, "module", model)  # a DeepSpeed / torch engine holds the model
    cached = getattr(module, "_tokenmill_head", False)
    if cached is not False:
        return cached
    head, vocab = _output_embedding(module)
    wrapped = None
    if head is not None:
        wrapped = TrainedPositionHead(head, vocab)
        why = _probe(model, module, wrapped)
        if why:
            head.forward = wrapped.forward
            log.info("loss: full-vocabulary logits at every position (%s)", why)
            wrapped = None
    object.__setattr__(module, "_tokenmill_head", wrapped)
    return wrapped


def _output_embedding(module):
    try:
        head = module.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, 0
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Module) or weight is None:
        return None, 0
    vocab = int(getattr(head, "out_features", 0) or 0)
    if not vocab:
        config = getattr(module, "config", None)
        vocab = int(getattr(config, "vocab_size", 0) or 0)
    return (head, vocab) if vocab else (None, 0)


@torch.no_grad()
def _probe(model, module, wrapped: TrainedPositionHead) -> str | None:
    """Compare the head path with full logits on a fixed small batch: None when equal."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, wrapped.vocab, (PROBE_ROWS, PROBE_LEN), generator=gen).to(device)
    target = torch.full_like(ids, IGNORE)
    target[:, :-1] = ids[:, 1:]
    target[0, : PROBE_LEN // 2] = IGNORE  # an untrained stretch, as in SFT
    inputs = {"input_ids": ids, "use_cache": False}
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            full = model(**inputs).logits
            want = F.cross_entropy(full.float().reshape(-1, full.size(-1)), target.reshape(-1),
                                   ignore_index=IGNORE, reduction="none").view(target.shape)
            wrapped.target = target
            try:
                got = model(**inputs).logits
            finally:
                wrapped.target = None
    except Exception as e:  # a model whose forward does not take this path
        return f"the trained-positions head failed its probe: {type(e).__name__}: {e}"
    finally:
        module.train(was_training)
    tol = PROBE_TOL.get(full.dtype, 2e-2)
    if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=tol, atol=tol):
        return "this model changes the logits after its output embedding"
    return None
