"""Model side of training: config, model build (pretrained or from scratch; a model without an
sdpa kernel gets its own default attention), embedding resize, the tokenizer's special ids,
LoRA, parameter freezing, MoE leaf modules, the packed-row leak check run before step 0
(`check_packing`), the packed-batch loss, and saving in the layout the model trains in (fused
MoE experts stay fused: `save_pretrained_fused`). The tokenizer is train/tokenizer.py's.

Attention on packed rows: transformers ≥ 4.53 derives per-document masks itself when it gets
`position_ids` that restart at 0 and no `attention_mask` / cache (masking_utils
`find_packed_sequence_indices` → block-diagonal causal mask for sdpa/eager). With
flash-attention 2 we pass the stream's `cu_seqlens` / `max_seqlen` as the varlen kwargs
(`cu_seq_lens_q/k`, `max_length_q/k`), which also covers batch > 1.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.constants import IGNORE

from .args import TrainError
from .head_loss import trained_position_head
from .tokenizer import load_tokenizer  # noqa: F401  (the trainer's tokenizer: train/tokenizer.py)

log = logging.getLogger("train")
DEFAULT_MOE_PATTERN = re.compile(r"(MoE|Moe|MoeBlock|SparseMoeBlock)$")


# ---------------------------------------------------------------- config
def load_config(args, fallback_dir: str | None = None, vocab_size: int | None = None):
    """The model config: from --model_name_or_path, --model_config (a JSON file or a dir),
    or, when resuming without either, the config saved in the checkpoint. A --model_config
    JSON without vocab_size gets the tokenizer's size."""
    from transformers import AutoConfig
    src = args.model_name_or_path or args.model_config or fallback_dir
    flag = ("--model_name_or_path" if args.model_name_or_path else
            "--model_config" if args.model_config else "--resume_from_checkpoint")
    if src is None or not Path(src).exists():
        raise TrainError(f"{flag} {src}: no such file or directory")
    if args.model_name_or_path and not (Path(src) / "config.json").is_file():
        raise TrainError(f"--model_name_or_path {src}: not a Hugging Face model dir (no config.json)")
    try:
        if Path(src).is_file():
            d = json.loads(Path(src).read_text())
            if "model_type" not in d:
                raise TrainError(f"--model_config {src}: needs a 'model_type' (e.g. \"llama\", \"qwen2\")")
            model_type = d.pop("model_type")
            if vocab_size and "vocab_size" not in d:
                d["vocab_size"] = vocab_size
            return AutoConfig.for_model(model_type, **d)
        return AutoConfig.from_pretrained(src, trust_remote_code=args.trust_remote_code)
    except TrainError:
        raise
    except Exception as e:
        hint = " (pass --trust_remote_code for custom model code)" if "trust_remote_code" in str(e) else ""
        raise TrainError(f"{flag} {src}: cannot load the config: {e}{hint}") from e


def attn_implementation(use_flash_attn: bool) -> str:
    if not use_flash_attn:
        return "sdpa"
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            log.warning("--use_flash_attn: the flash_attn package is not installed; using sdpa "
                        "with per-document masks")
    else:
        log.warning("--use_flash_attn: no GPU; using sdpa with per-document masks")
    return "sdpa"


# ---------------------------------------------------------------- model build
def build_model(args, config, tokenizer, *, dtype: torch.dtype, zero_stage: int):
    """Load or initialise the model and apply resize, checkpointing, LoRA and freezing.
    Under ZeRO-3 the caller keeps an HfDeepSpeedConfig alive, so transformers builds the
    model inside deepspeed.zero.Init (partitioned from the start)."""
    from transformers import AutoModelForCausalLM
    attn = "eager" if getattr(args, "flash_attn", "auto") == "disabled" else attn_implementation(args.use_flash_attn)
    config.use_cache = False  # a cache would also switch off packed-sequence masking
    kw = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=args.trust_remote_code)

    def load():
        if args.model_name_or_path:
            return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, **kw)
        torch.manual_seed(args.seed)  # same initial weights for the same seed
        return AutoModelForCausalLM.from_config(config, **kw)
    try:
        try:
            model = load()
        except ValueError as e:
            if "does not support an attention implementation" not in str(e):
                raise
            # e.g. Mamba, or a model without an sdpa kernel: its own default attention instead
            log.info("%s does not support %s attention: using the model's default", config.model_type, attn)
            config._attn_implementation = None
            kw.pop("attn_implementation")
            model = load()
            attn = model.config._attn_implementation
    except Exception as e:
        where = args.model_name_or_path or args.model_config
        hint = " (pass --trust_remote_code for custom model code)" if "trust_remote_code" in str(e) else ""
        raise TrainError(f"cannot build the model from {where}: {' '.join(str(e).split())}{hint}") from e

    resized = resize_embeddings(model, len(tokenizer))
    set_special_ids(model, args, tokenizer)
    if args.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {"use_reentrant": False}
        enable(kwargs)  # non-reentrant by default: no input-grad hack needed for LoRA
        if kwargs.get("use_reentrant") and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # reentrant + frozen embeddings: LoRA would get no gradient
    if args.use_lora:
        model = apply_lora(model, args, resized)
    if args.train_attention_params_only:
        freeze_all_but_attention(model)
    if args.make_moe_param_leaf_module:
        if zero_stage == 3:
            mark_moe_leaf_modules(model, args.moe_leaf_module_classes)
        else:
            log.warning("--make_moe_param_leaf_module only matters under ZeRO-3 (stage %d here); ignored",
                        zero_stage)
    n_train = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    n_all = sum(_numel(p) for p in model.parameters())
    log.info("model: %s, %s parameters, %s trainable, attention %s",
             type(model).__name__, f"{n_all:,}", f"{n_train:,}", attn)
    if n_train == 0:
        raise TrainError("no trainable parameters left (check --train_attention_params_only / LoRA targets)")
    return model


def set_special_ids(model, args, tokenizer) -> None:
    """A model built from a --model_config JSON gets the tokenizer's bos/eos/pad ids (the ids the
    lock records, the stream pads with) where the JSON names none, so the saved config and
    generation_config describe the vocabulary it was trained on (not the model type's defaults)."""
    src = Path(args.model_config) if args.model_config and not args.model_name_or_path else None
    if src is None or not src.is_file():
        return
    given = json.loads(src.read_text())
    for key in ("bos", "eos", "pad"):
        v = getattr(tokenizer, f"{key}_id", None)
        if v is not None and f"{key}_token_id" not in given:
            for cfg in (model.config, getattr(model, "generation_config", None)):
                if cfg is not None:
                    setattr(cfg, f"{key}_token_id", int(v))


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions report their full size here


def resize_embeddings(model, n_tokens: int) -> bool:
    """Grow the embeddings when the tokenizer has more tokens than the model (never shrink:
    checkpoints are often padded to a multiple of 64/128)."""
    current = model.get_input_embeddings().weight
    rows = getattr(current, "ds_shape", current.shape)[0]
    if n_tokens <= rows:
        return False
    log.info("resizing token embeddings %d → %d (tokenizer has more tokens than the model)", rows, n_tokens)
    model.resize_token_embeddings(n_tokens)
    return True


def apply_lora(model, args, resized: bool):
    from peft import LoraConfig, TaskType, get_peft_model
    targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    if targets == ["all"]:  # LLaMA-Factory: every Linear leaf but the output layer
        out_emb = model.get_output_embeddings()
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if "Linear" in type(m).__name__ and "Embedding" not in type(m).__name__
                          and m is not out_emb and n})
    to_save = [t.strip() for t in (args.modules_to_save or "").split(",") if t.strip()]
    if resized:
        # New embedding rows exist only in this run: they must be trained and saved with the
        # adapter, else the merged model would not have them.
        for name in _embedding_module_names(model):
            if name not in to_save:
                log.warning("embeddings were resized: adding %r to --modules_to_save", name)
                to_save.append(name)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets + to_save if t not in present]
    if missing:
        raise TrainError(f"LoRA: no module named {', '.join(missing)} in {type(model).__name__} "
                         f"(see --lora_target_modules / --modules_to_save)")
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_rank, lora_alpha=args.lora_alpha,
                     lora_dropout=args.lora_dropout, target_modules=targets,
                     modules_to_save=to_save or None)
    return get_peft_model(model, cfg)


def _embedding_module_names(model) -> list[str]:
    names = []
    by_module = {id(m): n for n, m in model.named_modules()}
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        if m is not None and id(m) in by_module:
            names.append(by_module[id(m)].rsplit(".", 1)[-1])
    return list(dict.fromkeys(names))


def freeze_all_but_attention(model) -> None:
    """As Hunyuan's --train_attention_params_only: train names containing 'self_attn'."""
    for name, p in model.named_parameters():
        if "self_attn" not in name:
            p.requires_grad_(False)


def find_moe_classes(model, names: str | None = None) -> list[type]:
    wanted = {n.strip() for n in names.split(",")} if names else None
    found = {}
    for m in model.modules():
        cls = type(m)
        if (cls.__name__ in wanted) if wanted else bool(DEFAULT_MOE_PATTERN.search(cls.__name__)):
            found[cls.__name__] = cls
    if wanted and wanted - set(found):
        raise TrainError(f"--moe_leaf_module_classes: no module of class {', '.join(sorted(wanted - set(found)))}")
    return list(found.values())


def mark_moe_leaf_modules(model, names: str | None = None) -> list[type]:
    """ZeRO-3 leaf modules: DeepSpeed gathers a whole MoE block at once instead of hooking
    every expert (which stalls when tokens route to different experts on different ranks)."""
    from deepspeed.utils import set_z3_leaf_modules
    classes = find_moe_classes(model, names)
    if not classes:
        log.warning("--make_moe_param_leaf_module: no MoE block found (class names ending in MoE/Moe); "
                    "name them with --moe_leaf_module_classes")
        return []
    set_z3_leaf_modules(model, classes)
    log.info("ZeRO-3 leaf modules: %s", ", ".join(c.__name__ for c in classes))
    return classes


# ---------------------------------------------------------------- packed rows
# Layers that carry state along the sequence whatever position_ids say: a packed row would
# leak document A into document B. Named in the refusal; the check below is what decides.
STATEFUL_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "zamba", "zamba2", "bamba",
                        "qwen3_next", "lfm2", "lfm2_moe", "granitemoehybrid", "nemotron_h", "rwkv",
                        "recurrent_gemma", "xlstm", "minimax", "plamo2")


@torch.no_grad()
def check_packing(model, packing: str, use_varlen: bool = False, n_a: int = 13, n_b: int = 11) -> float | None:
    """Before step 0 (every rank, same inputs): the logits of document B packed after document A
    in one row (position_ids restarting at 0, as the stream builds them) must equal B's logits
    alone. Raises TrainError naming --packing padded when they do not (a recurrent, convolutional
    or linear-attention layer, or an attention path that ignores the document boundary).
    Returns the relative difference found (None when rows are not packed)."""
    if packing != "packed":
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    vocab = int(getattr(cfg, "vocab_size", 0) or 0) or 32
    device = next(iter(base.parameters())).device
    g = torch.Generator().manual_seed(0)
    a = torch.randint(min(3, vocab - 1), vocab, (n_a,), generator=g)
    b = torch.randint(min(3, vocab - 1), vocab, (n_b,), generator=g)

    def row(docs):
        ids = torch.cat(docs)[None].to(device)
        pos = torch.cat([torch.arange(len(d)) for d in docs])[None].to(device)
        cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(device=device, dtype=torch.int32)
        batch = {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu,
                 "max_seqlen": torch.tensor(max(len(d) for d in docs))}
        return model(**model_inputs(batch, use_varlen)).logits.float()

    was_training = model.training
    model.eval()  # no dropout
    try:
        packed = row([a, b])[0, n_a:]
        alone = row([b])[0]
    finally:
        model.train(was_training)
    rel = float((packed - alone).abs().mean() / alone.abs().mean().clamp_min(1e-6))
    half = next(iter(base.parameters())).dtype in (torch.float16, torch.bfloat16)
    if rel > (5e-2 if half else 1e-3):  # a leak moves B's logits by tens of percent
        kind = getattr(cfg, "model_type", type(base).__name__)
        why = (" (its layers carry state along the sequence: recurrent / convolutional / linear attention)"
               if kind in STATEFUL_MODEL_TYPES else "")
        raise TrainError(f"packed rows leak between documents in this {kind} model{why}: the logits of a "
                         f"document packed after another differ from the document alone (mean relative "
                         f"difference {rel:.3g}); train it with --packing padded")
    log.info("packed rows: a document packed after another has the logits it has alone (relative "
             "difference %.2g)", rel)
    return rel


# ---------------------------------------------------------------- loss
def shift_labels(batch: dict) -> torch.Tensor:
    """Targets aligned with the logits: target[t] = labels[t+1], and -100 where t+1 starts a
    new document (position_ids == 0): no cross-document predictions in packed rows, even if
    a stream labels a document's first token."""
    labels = batch["labels"]
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    pos = batch.get("position_ids")
    if pos is not None:
        target[:, :-1].masked_fill_(pos[:, 1:] == 0, IGNORE)
    return target


def model_inputs(batch: dict, use_varlen: bool) -> dict:
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    for k in ("attention_mask", "position_ids"):
        if k in batch:
            inputs[k] = batch[k]
    if use_varlen and "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].to(torch.int32)
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=int(batch["max_seqlen"]), max_length_k=int(batch["max_seqlen"]))
    return inputs


def loss_sum(model, batch: dict, use_varlen: bool = False, per_token: bool = False):
    """Summed token cross-entropy (fp32) and the number of predicted tokens of one micro-batch;
    with per_token: (the [B, L] token losses, 0 where untrained, and the targets). The caller
    divides by the global token count of the step (see train/loop.py)."""
    target = shift_labels(batch)
    head = trained_position_head(model) if per_token else None
    if head is not None:  # the head and cross-entropy at trained positions only (train/head_loss.py)
        head.target = target
        try:
            return model(**model_inputs(batch, use_varlen)).logits, target
        finally:
            head.target = None
    logits = model(**model_inputs(batch, use_varlen)).logits
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                             ignore_index=IGNORE, reduction="none" if per_token else "sum")
    if per_token:
        return losses.view(target.shape), target
    return losses, int((target != IGNORE).sum())


def save_pretrained_fused(module, out, state_dict=None) -> None:
    """save_pretrained that keeps the layout the model trains in. transformers 5 writes a fused
    MoE model (experts as [E, 2I, H] gate_up_proj / [E, H, I] down_proj) back per expert unless
    told `save_original_format=False`, even given `state_dict=`; the fused files load directly
    (train/check_converted.py checks them). A PEFT adapter is saved as PEFT writes it."""
    import inspect
    kw = dict(state_dict=state_dict, safe_serialization=True)
    if "save_original_format" in inspect.signature(module.save_pretrained).parameters:
        kw["save_original_format"] = False
    module.save_pretrained(str(out), **kw)


def copy_model_code(model_dir: str | None, out_dir: Path) -> None:
    """Custom modeling files (trust_remote_code models) travel with saved models."""
    if not model_dir or not Path(model_dir).is_dir():
        return
    for f in Path(model_dir).glob("*.py"):
        target = out_dir / f.name
        if not target.exists():
            target.write_bytes(f.read_bytes())
