"""A plain-PyTorch engine for one-process runs, where DeepSpeed's ZeRO partitions nothing.

It offers exactly the surface train/loop.py, train/checkpoint.py and train/trainer.py use of a
DeepSpeed engine, with DeepSpeed's semantics, so the loop and the checkpointer need no branch:

* `engine(**inputs)` is the module's forward; `train()` / `eval()`; `module`, `device`,
  `optimizer`, `lr_scheduler`.
* `backward(loss)` divides by `gradient_accumulation_steps` (DeepSpeed's `scale_wrt_gas`).
* `step()` counts micro-steps and, at the accumulation boundary only, measures the gradient
  norm (before clipping, in fp64 as ZeRO-1/2 report it), clips to `gradient_clipping` by
  ZeRO's factor 1 / max(1, (norm + 1e-6) / clip), steps the optimizer, zeroes the gradients and steps
  the lr scheduler once.
* `get_lr()` / `get_global_grad_norm()`.
* `save_checkpoint(save_dir, tag=, client_state=, save_latest=)` / `load_checkpoint(load_dir,
  tag=, load_optimizer_states=, load_lr_scheduler_states=)` with DeepSpeed's signatures; the
  states go to one torch.save file, SAVE_DIR/TAG/torch_engine_state.pt (model, optimizer,
  scheduler, counters), readable with torch.load(weights_only=True). DeepSpeed cannot read it
  and this engine cannot read DeepSpeed's: train/trainer.py refuses such a resume up front.

bf16 casts the parameters (not the buffers) and keeps fp32 master weights in the optimizer, as
DeepSpeed's bf16 does: with one micro-batch per step losses and norms equal DeepSpeed's ZeRO-2 to
1e-7. Gradients of several micro-batches are summed in fp32 here, in bf16 by DeepSpeed (its default
grad_accum_dtype), so with accumulation the two drift apart by ~1e-5. fp16 (loss scaling) and
ZeRO-3 / offload stay with DeepSpeed (the rule is `choose_engine` in train/ds_config.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

STATE_FILE = "torch_engine_state.pt"
FORMAT = "tokenmill-torch-engine/1"


def is_torch_checkpoint(ckpt: str | Path) -> bool:
    return (Path(ckpt) / STATE_FILE).is_file()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients as ZeRO-1/2 computes it: each tensor's norm in fp64, summed in
    fp64, then fp32. (A plain fp32 norm of a 6000 x 64 embedding gradient is off by ~2e-5.)"""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = [torch.linalg.vector_norm(g.detach().to(torch.float64), 2.0) for g in grads]
    return torch.stack([n.to(grads[0].device) for n in norms]).pow(2).sum().float().pow(0.5)


class TorchEngine:
    def __init__(self, model: torch.nn.Module, optimizer_factory, scheduler_factory, *,
                 gradient_accumulation_steps: int, gradient_clipping: float, bf16: bool = False,
                 device: torch.device | None = None):
        """optimizer_factory(param_groups) -> torch optimizer, given the groups of trainable
        parameters (fp32 masters under bf16); scheduler_factory(optimizer) -> lr scheduler."""
        self.device = device or default_device()
        self.bf16 = bf16
        self.module = model.to(self.device)
        if bf16:  # as DeepSpeed's bf16: parameters only; buffers (rotary inv_freq) stay fp32
            for p in self.module.parameters():
                if p.is_floating_point() and p.dtype != torch.bfloat16:
                    p.data = p.data.to(torch.bfloat16)
        self.gas = int(gradient_accumulation_steps)
        self.clip = float(gradient_clipping or 0.0)
        self.micro_steps = self.global_steps = 0
        self._grad_norm: float | None = None
        self._groups = None  # set by init(): [{"params": [model params], ...}]
        self.optimizer_factory, self.scheduler_factory = optimizer_factory, scheduler_factory

    def init(self, param_groups: list[dict]) -> "TorchEngine":
        """Build the optimizer over `param_groups` (dicts with "params" and per-group settings)."""
        self._groups = param_groups
        if self.bf16:  # fp32 masters: the optimizer updates these; the bf16 params are copies
            self._masters = [[p.detach().float().clone().requires_grad_(True) for p in g["params"]]
                             for g in param_groups]
            opt_groups = [{**g, "params": m} for g, m in zip(param_groups, self._masters)]
        else:
            self._masters = None
            opt_groups = param_groups
        self.optimizer = self.optimizer_factory(opt_groups)
        self.lr_scheduler = self.scheduler_factory(self.optimizer)
        return self

    # ------------------------------------------------------------ the DeepSpeed engine surface
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    forward = __call__

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def _model_params(self):
        return [p for g in self._groups for p in g["params"]]

    def _opt_params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        loss = loss / self.gas if self.gas > 1 else loss
        loss.backward()
        if self._masters is not None:  # accumulate in fp32, not in the bf16 .grad
            for p, m in zip(self._model_params(), self._opt_params()):
                if p.grad is not None:
                    g = p.grad.float()
                    m.grad = g if m.grad is None else m.grad.add_(g)
                    p.grad = None
        return loss

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gas == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self._opt_params() if p.grad is not None]
            norm = global_norm(grads)
            if self.clip > 0 and grads:
                # ZeRO-1/2's factor: divide by max(1, (norm + 1e-6) / clip)
                scale = 1.0 / torch.clamp((norm + 1e-6) / self.clip, min=1.0)
                torch._foreach_mul_(grads, scale)
            self._grad_norm = float(norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.module.zero_grad(set_to_none=True)
            if self._masters is not None:
                with torch.no_grad():
                    for p, m in zip(self._model_params(), self._opt_params()):
                        p.copy_(m)
            self.lr_scheduler.step()
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        save_latest: bool = False) -> bool:
        ckpt = Path(save_dir) / tag
        ckpt.mkdir(parents=True, exist_ok=True)
        state = {"format": FORMAT, "world_size": 1, "bf16": self.bf16,
                 "module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                 "masters": None if self._masters is None else
                 [[m.detach().cpu() for m in g] for g in self._masters],
                 "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                 "global_steps": self.global_steps, "micro_steps": self.micro_steps,
                 "client_state": dict(client_state or {})}
        tmp = ckpt / f".{STATE_FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, ckpt / STATE_FILE)
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)
        return True

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, **_ignored):
        """-> (path, client_state), or (None, None) when the dir holds no torch-engine state
        (DeepSpeed's convention; train/checkpoint.py turns it into a one-line error)."""
        if tag is None:
            latest = Path(load_dir) / "latest"
            if not latest.is_file():
                return None, None
            tag = latest.read_text().strip()
        path = Path(load_dir) / tag / STATE_FILE
        if not path.is_file():
            return None, None
        try:
            return self._load_state(path, load_optimizer_states, load_lr_scheduler_states)
        except Exception as e:  # a truncated or edited file: one line naming it, not a traceback
            from .args import TrainError
            raise TrainError(f"{path}: cannot resume from this torch-engine state ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}); resume from another checkpoint") from None

    def _load_state(self, path: Path, load_optimizer_states: bool, load_lr_scheduler_states: bool):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        self.module.load_state_dict(state["module"])
        if self._masters is not None:
            saved = state.get("masters")
            with torch.no_grad():
                for g, sg in zip(self._masters, saved or []):
                    for m, s in zip(g, sg):
                        m.copy_(s)
                if saved is None:  # saved in fp32: the masters are the loaded weights
                    for p, m in zip(self._model_params(), self._opt_params()):
                        m.copy_(p.float())
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps, self.micro_steps = state["global_steps"], state["micro_steps"]
        return str(path.parent), state["client_state"]
