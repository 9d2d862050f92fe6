"""The run's settings: one frozen, typed dataclass, `TrainConfig`, and the only list of them.

Every setting is a field here, with its type, default, help and the command-line names it
answers to (`flags`: the first is the canonical one, the others the seed scripts' aliases). Three
views produce the same object: the flags (train/args.py builds its argparse parser from these
fields), a LLaMA-Factory YAML file and its `key=value` overrides (train/lf_yaml.py maps LF keys
onto these fields). `check_settings` (train/args.py) then validates the combination and adds
the derived fields (`validation_percentage`, `explicit`, `notes`); train/ds_config.py later
settles the numbers shared with the DeepSpeed JSON. Nothing mutates a TrainConfig: a later
stage makes a new one with `replace`.

Fields stay flat (one namespace, `cfg.max_steps`), grouped by `group` for `--help` only: the
trainer, the checkpointer and train_args.json all read the same flat names. A default of None
means "unset": the DeepSpeed JSON, the lock or the model dir supplies it (the help says which).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

# How a field is given on the command line.
VALUE, FLAG, HF_BOOL, JSON = "value", "flag", "hf_bool", "json"


def setting(default: Any, help: str = "", *flags: str, group: str = "data", kind: str = VALUE,
            type: Callable | None = None, choices: tuple | None = None, hidden: bool = False):
    """A TrainConfig field. `flags` empty: `--<name>`; `flags=()` via cli=False: no flag (YAML only)."""
    return field(default=default, metadata=dict(help=help, flags=flags, group=group, kind=kind, type=type,
                                                choices=choices, hidden=hidden, cli=True))


def yaml_only(default: Any, help: str, group: str = "data"):
    """A setting given only in a config file or a key=value override (no flag: `--dataset` must
    stay an unknown flag, not a new meaning of a mistyped `--dataset_dir`)."""
    return field(default=default, metadata=dict(help=help, flags=(), group=group, kind=VALUE, type=None,
                                                choices=None, hidden=True, cli=False))


def derived(default: Any, help: str):
    return field(default=default, metadata=dict(help=help, derived=True, cli=False))


SCHEDULERS = ("cosine", "cosine_with_min_lr", "linear", "constant", "constant_with_warmup")
PACKINGS = ("packed", "padded", "concat")
FLASH_ATTN = ("auto", "disabled", "sdpa", "fa2")


@dataclass(frozen=True)
class TrainConfig:
    # ------------------------------------------------------------------ data
    mixture: str | None = setting(None, "mixture.lock.json written by `python -m pipeline build` (a manifest "
                                  "is built first, into OUTPUT_DIR/data)")
    train_data_file: str | None = setting(None, "a .jsonl/.json/.txt file or a dir of them; built into shards (or "
                                          "reused from the cache) through the pipeline, then trained as a lock")
    dataset_dir: str | None = setting(None, "Chinese-LLaMA-Alpaca: a dir whose *.txt / *.json / *.jsonl files "
                                      "become one dataset each, built through the pipeline; shares per "
                                      "--dataset_dir_shares")
    dataset_dir_shares: str = setting("tokens", "--dataset_dir: each file's token share is its built tokens "
                                      "(tokens: as the seed's concatenation of the files) or the same for every "
                                      "file (equal)", choices=("tokens", "equal"))
    dataset: str | None = yaml_only(None, "LLaMA-Factory: comma list of entries of DATASET_INFO_DIR/dataset_info.json")
    dataset_info_dir: str = yaml_only("data", "LLaMA-Factory `dataset_dir`: the folder holding dataset_info.json")
    max_samples: int | None = yaml_only(None, "LLaMA-Factory: the first N records of each dataset (no shuffle)")
    mix_strategy: str = yaml_only("concat", "LLaMA-Factory: concat (each record once per epoch: shares follow "
                                  "the datasets' sizes) or interleave_under/over (--interleave_probs)")
    interleave_probs: str | None = yaml_only(None, "LLaMA-Factory: comma list of per-dataset sample probabilities")
    template: str | None = setting(None, "chat template of a manifest or data file to build (as the pipeline's "
                                   "--template): tokenizer, chatml, none, hunyuan, hy3, a LLaMA-Factory name or a "
                                   ".jinja file; default: the manifest's")
    max_seq_length: int | None = setting(None, "sequence length; default: the lock's max_length",
                                         "--max_seq_length", "--model_max_length", "--max-length", type=int)
    packing: str = setting("packed", "packed: whole documents per row, attention per document; padded: one "
                           "sample per row; concat: documents joined with EOS and cut (pretraining)", choices=PACKINGS)
    validation_split_percentage: float = setting(
        0.0, "held-out share of each dataset, chosen by sample, stable across runs and world sizes. A value >= 1 "
        "is a PERCENT (5 = 5%%, HF run_clm); a value < 1 is a FRACTION as Chinese-LLaMA-Alpaca passes it "
        "(0.001 = 0.1%%). The held-out count is printed", type=float)
    data_seed: int | None = setting(None, "seed of the sample order; default: the lock's seed", type=int)
    num_workers: int = setting(0, "DataLoader workers per rank", type=int)
    preprocessing_num_workers: int | None = setting(None, "build workers for --train_data_file / --dataset_dir / "
                                                    "a manifest", type=int)
    allow_lock_change: bool = setting(False, "resume even though the lock changed", kind=FLAG)
    allow_tokenizer_mismatch: bool = setting(False, "train although the lock was built with another tokenizer "
                                             "(dangerous)", kind=FLAG)
    data_cache_dir: str | None = setting(None, "cache of built datasets for --train_data_file / --dataset_dir; "
                                         "default: $TOKENMILL_CACHE or OUTPUT_DIR/data/cache")
    verify_data: str = setting("cheap", "check the built data before step 0: cheap = meta.json, lock and sizes; "
                               "full = also the sha256 and structure of every shard (as `pipeline verify`)",
                               choices=("cheap", "full"))

    # ------------------------------------------------------------------ model
    model_name_or_path: str | None = setting(None, "local Hugging Face model dir to start from", group="model")
    model_config: str | None = setting(None, "config.json (or a dir holding one) to initialise a model from "
                                       "scratch for pretraining", group="model")
    tokenizer_name_or_path: str | None = setting(None, "tokenizer dir; default: the model dir, else the lock's "
                                                 "(--tokenizer as the pipeline's)", "--tokenizer_name_or_path",
                                                 "--tokenizer", group="model")
    trust_remote_code: bool = setting(False, "allow custom modeling code in the model dir", group="model", kind=FLAG)
    use_flash_attn: bool = setting(False, "flash-attention 2 varlen kernels on GPU (falls back to sdpa with "
                                   "per-document masks where unavailable)", group="model", kind=FLAG)
    flash_attn: str = setting("auto", "LLaMA-Factory's attention choice: auto/sdpa = sdpa, fa2 = --use_flash_attn, "
                              "disabled = eager", group="model", choices=FLASH_ATTN)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward (less memory, ~30%% slower)", group="model", kind=HF_BOOL)
    gradient_checkpointing_kwargs: dict | None = setting(
        None, "JSON, e.g. '{\"use_reentrant\": true}' (default: non-reentrant)", group="model", kind=JSON)
    train_attention_params_only: bool = setting(False, "train only parameters whose name contains 'self_attn'",
                                                group="model", kind=FLAG)
    make_moe_param_leaf_module: bool = setting(False, "ZeRO-3: make MoE blocks leaf modules (gathered whole, not "
                                               "per expert)", group="model", kind=FLAG)
    moe_leaf_module_classes: str | None = setting(None, "comma list of class names to use as MoE leaf modules; "
                                                  "default: detected, names ending in MoE/Moe/MoeBlock", group="model")

    # ------------------------------------------------------------------ LoRA
    use_lora: bool = setting(False, "train a LoRA adapter (peft) instead of every weight; only the adapter and --modules_to_save are saved", group="lora", kind=FLAG)
    lora_rank: int = setting(64, "LoRA r", group="lora", type=int)
    lora_alpha: float = setting(8.0, "LoRA alpha (the update is scaled by alpha / r)", group="lora", type=float)
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", group="lora", type=float)
    lora_target_modules: str = setting("q_proj,k_proj,v_proj,o_proj", "comma list of module names, or 'all' "
                                       "(every Linear but the output layer, as LLaMA-Factory)",
                                       "--lora_target_modules", "--trainable", group="lora")
    modules_to_save: str | None = setting(None, "comma list of modules trained and saved in full "
                                          "(e.g. embed_tokens,lm_head)", group="lora")

    # ------------------------------------------------------------------ optimisation
    deepspeed: str = setting("zero2", "DeepSpeed JSON, or a shipped one: zero2, zero3, zero3_offload", group="optim")
    engine: str = setting(
        "auto", "what runs backward/step. auto: plain PyTorch (AdamW, the same schedule, clipping and accumulation "
        "as DeepSpeed; no DeepSpeed import) when the run is one process and the DeepSpeed config is ZeRO-0/1/2 "
        "without offload and without fp16 (ZeRO partitions nothing in one process); DeepSpeed for several ranks, "
        "ZeRO-3, offload or fp16 (they save memory or need its loss scaling). A resumed run keeps its checkpoint's "
        "engine; each engine reads only its own checkpoints", group="optim", choices=("auto", "deepspeed", "torch"))
    per_device_train_batch_size: int | None = setting(None, "default 1", group="optim", type=int)
    per_device_eval_batch_size: int | None = setting(None, "default: the train batch size", group="optim", type=int)
    gradient_accumulation_steps: int | None = setting(None, "default 1", group="optim", type=int)
    max_steps: int | None = setting(None, "optimizer steps (or give --num_train_epochs)", group="optim", type=int)
    num_train_epochs: float | None = setting(None, "without --max_steps: steps = epochs x the lock's train tokens "
                                             "(samples when padded) / tokens per step, printed", group="optim",
                                             type=float)
    learning_rate: float | None = setting(None, "peak lr; default 1e-05", group="optim", type=float)
    lr_scheduler_type: str = setting("cosine", "after linear warmup: cosine / cosine_with_min_lr (both decay to "
                                     "--min_lr at max_steps), linear (to --min_lr), constant (no warmup), "
                                     "constant_with_warmup", group="optim", choices=SCHEDULERS)
    min_lr: float = setting(0.0, "ABSOLUTE floor of the decay (not a ratio of --learning_rate)", group="optim",
                            type=float)
    warmup_ratio: float = setting(0.0, "warmup steps = ceil(ratio x max_steps) (HF's rule)", group="optim", type=float)
    warmup_steps: int | None = setting(None, "overrides --warmup_ratio", group="optim", type=int)
    weight_decay: float | None = setting(None, "default 0.0", group="optim", type=float)
    adam_beta1: float = setting(0.9, "AdamW beta1", group="optim", type=float)
    adam_beta2: float = setting(0.95, "AdamW beta2", group="optim", type=float)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon", group="optim", type=float)
    max_grad_norm: float | None = setting(None, "gradient clipping (0 = off); default 1.0", group="optim", type=float)
    bf16: bool = setting(False, "bfloat16 weights and compute with fp32 master weights (DeepSpeed bf16; the torch engine does the same)", group="optim", kind=HF_BOOL)
    fp16: bool = setting(False, "on a device without fp16 (CPU) this becomes fp32 with a note", group="optim",
                         kind=HF_BOOL)
    seed: int = setting(42, "model init, dropout", group="optim", type=int)

    # ------------------------------------------------------------------ evaluation, logging, checkpoints
    output_dir: str | None = setting(None, "where the model, checkpoints and logs go (required)", group="out")
    overwrite_output_dir: bool = setting(False, "start afresh in an OUTPUT_DIR that holds a finished or "
                                         "checkpointed run (else refused)", group="out", kind=FLAG)
    do_eval: bool = setting(False, "evaluate (needs --validation_split_percentage)", group="out", kind=FLAG)
    eval_steps: int | None = setting(None, "evaluate every N steps (and always at the end)", group="out", type=int)
    eval_strategy: str | None = setting(None, "'no' turns evaluation off; otherwise --eval_steps",
                                        "--evaluation_strategy", "--eval_strategy", group="out",
                                        choices=("no", "steps", "epoch"))
    max_eval_batches: int | None = setting(None, "cap on validation batches per rank", group="out", type=int)
    logging_steps: int = setting(1, "a console step line every N steps (train_log.jsonl keeps every step)", group="out", type=int)
    logging_strategy: str = setting("steps", "'no': no console step lines (train_log.jsonl keeps every step)",
                                    group="out", choices=("steps", "epoch", "no"))
    report_to: str = setting("tensorboard", "TensorBoard events in OUTPUT_DIR/runs, or none (all = tensorboard)", group="out", choices=("tensorboard", "none", "all"))
    save_steps: int = setting(500, "a checkpoint every N steps", group="out", type=int)
    save_strategy: str = setting("steps", "'no': no intermediate checkpoints (the final model is still saved)",
                                 group="out", choices=("steps", "no", "epoch"))
    save_total_limit: int | None = setting(None, "keep only the newest N checkpoints", group="out", type=int)
    resume_from_checkpoint: str | None = setting(None, "OUTPUT_DIR/checkpoint-N, or 'latest' (the newest complete "
                                                 "checkpoint in --output_dir)", group="out")
    stop_after_steps: int | None = setting(None, "end this run (with a checkpoint) after N steps of it, without "
                                           "ending the schedule: for time-limited jobs", group="out", type=int)
    ddp_timeout: int = setting(1800, "seconds a collective may wait", group="out", type=int)
    local_rank: int = setting(-1, "set by the deepspeed launcher; the rank comes from the environment", group="out", type=int, hidden=True)  # the deepspeed launcher passes it

    # ------------------------------------------------------------------ derived (check_settings)
    validation_percentage: float = derived(0.0, "the held-out percent (a fraction < 1 read as CLA does)")
    explicit: frozenset = derived(frozenset(), "names of the settings the user gave (flag, YAML or key=value)")
    notes: tuple = derived((), "one line each: what a seed flag or key means here")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _refuse_assignment(self, name, value):
    raise dataclasses.FrozenInstanceError(f"TrainConfig is frozen: use .replace({name}=...)")


TrainConfig.__setattr__ = _refuse_assignment  # the dataclass's own message does not say how to change one


def settings() -> list[dataclasses.Field]:
    """The user-settable fields (not the derived ones), in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("derived")]


def defaults() -> dict:
    return {f.name: f.default for f in settings()}
