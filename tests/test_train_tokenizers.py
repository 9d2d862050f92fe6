"""Every tokenizer the pipeline accepts trains: locks built with Mistral's SentencePiece .model
and Hunyuan's tiktoken dir (whose tokenizer_config names remote code it does not ship) train
2 steps; the saved model (and the merged LoRA model) carries the tokenizer's files, which load
back to the same encoding. train.merge_lora never prints a traceback."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED
from test_train_helpers import read_log, run_train

from train.merge_lora import main as merge_main

MISTRAL = SHARED / "tokenizers" / "mistral-sentencepiece" / "tokenizer.model"
HUNYUAN = SHARED / "tokenizers" / "hunyuan-a13b"
TEXT = "Tokenizers: SentencePiece, tiktoken and HF all train here. 你好，世界！"
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": False}
COMMON = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_seq_length", "128"]


def build_lock(root, tokenizer):
    from pipeline.build import build_mixture
    from tests.conftest import SAMPLE
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"tokenizer": str(tokenizer), "template": "none", "max_length": 256, "seed": 7,
                "datasets": [{"dataset_name": "pt", "task_name": "pt", "abs_weight": 1.0,
                              "path": str(SAMPLE / "pretrain_en.txt")}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    lock, _, _ = build_mixture(str(root / "manifest.json"), out=str(root / "build"), workers=1)
    return lock, json.loads(open(lock).read())["tokenizer"]


def same_encoding(saved_dir, source, lock=None):
    """The saved files are the source tokenizer: same encoding, and a run resuming from them
    accepts the lock (the vocabularies are compared, as the trainer does on resume)."""
    from stages.tokenizer import load_tokenizer
    from train.data import check_tokenizer
    from train.tokenizer import load_tokenizer as train_tokenizer
    a, b = load_tokenizer(str(saved_dir)), load_tokenizer(str(source))
    assert a.vocab_size == b.vocab_size
    assert a.encode_texts([TEXT]) == b.encode_texts([TEXT])
    if lock is not None:
        check_tokenizer(json.loads(open(lock).read()), str(saved_dir), train_tokenizer(str(saved_dir)), False)
    return a


@pytest.mark.slow
def test_sentencepiece_model_lock_trains(tmp_path):
    if not MISTRAL.is_file():
        pytest.skip(f"{MISTRAL} absent (../shared not mounted)")
    import sentencepiece
    lock, info = build_lock(tmp_path / "data", MISTRAL)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))  # no vocab_size: the lock's tokenizer gives it
    out = tmp_path / "out"
    run_train(["--mixture", str(lock), "--model_config", str(cfg), "--output_dir", str(out), *COMMON])
    steps, _ = read_log(out)
    assert sorted(steps) == [1, 2]
    saved = json.loads((out / "config.json").read_text())
    assert saved["vocab_size"] == info["vocab_size"] == 32000
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (info["bos_id"], info["eos_id"])
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape[0] == 32000
    tok = same_encoding(out, MISTRAL, lock)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL))  # the library itself
    assert tok.encode_texts(["Hello world, tokens."]) == [sp.encode("Hello world, tokens.")]
    assert (info["bos_id"], info["eos_id"]) == (sp.bos_id(), sp.eos_id())


@pytest.mark.slow
def test_hunyuan_tiktoken_lock_trains_lora_and_merges(tmp_path):
    if not (HUNYUAN / "hy.tiktoken").is_file():
        pytest.skip(f"{HUNYUAN} absent (../shared not mounted)")
    from transformers import AutoConfig, AutoModelForCausalLM
    lock, info = build_lock(tmp_path / "data", HUNYUAN)
    spec = dict(TINY, vocab_size=info["vocab_size"])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)  # no tokenizer: the lock's is used
    out = tmp_path / "lora"
    # the seed passes --trust_remote_code for its model: the tokenizer is still read as tiktoken
    run_train(["--mixture", str(lock), "--model_name_or_path", str(base), "--output_dir", str(out), *COMMON,
               "--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--trust_remote_code"])
    steps, _ = read_log(out)
    assert sorted(steps) == [1, 2]
    assert (out / "hy.tiktoken").is_file() and (out / "adapter_model.safetensors").is_file()
    same_encoding(out, HUNYUAN, lock)
    merged = tmp_path / "merged"
    assert merge_main(["--base_model_path", str(base), "--adapter_model_path", str(out),
                       "--output_path", str(merged), "--save_dtype", "bf16"]) == 0
    same_encoding(merged, HUNYUAN)
    assert not (merged / "train_log.jsonl").exists()
    m = AutoModelForCausalLM.from_pretrained(merged)
    assert m.get_input_embeddings().weight.shape[0] == info["vocab_size"] and m.dtype == torch.bfloat16


def test_merge_lora_faults_are_one_line(tmp_path, capsys):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "my_custom", "architectures": ["MyForCausalLM"],
                                                  "auto_map": {"AutoModelForCausalLM": "modeling_my.MyForCausalLM"}}))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    flags = ["--base_model_path", str(base), "--adapter_model_path", str(adapter), "--output_path",
             str(tmp_path / "m"), "--save_dtype", "bf16"]
    assert merge_main(flags) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust_remote_code" in err and "Traceback" not in err
    assert merge_main(flags + ["--trust_remote_code"]) == 1  # the code is not there: still one line
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        merge_main(["--base_model", str(base), "--adapter_model_path", str(adapter), "--output_path", "x"])
    assert e.value.code == 2


def test_model_from_config_json_takes_the_tokenizers_special_ids(tmp_path):
    """A from-scratch model gets the lock tokenizer's ids, not its model type's defaults."""
    from types import SimpleNamespace

    from train.model import build_model
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({**TINY, "vocab_size": 300, "bos_token_id": 7}))
    from transformers import AutoConfig
    spec = {**TINY, "vocab_size": 300, "bos_token_id": 7}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    args = SimpleNamespace(use_flash_attn=False, trust_remote_code=False, model_name_or_path=None,
                           model_config=str(cfg_path), seed=0, gradient_checkpointing=False, use_lora=False,
                           train_attention_params_only=False, make_moe_param_leaf_module=False)

    class Tok(SimpleNamespace):
        def __len__(self):
            return 300
    tok = Tok(bos_id=5, eos_id=260, pad_id=261)
    model = build_model(args, config, tok, dtype=torch.float32, zero_stage=0)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (7, 260, 261)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (260, 261)
