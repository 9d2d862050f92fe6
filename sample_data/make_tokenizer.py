"""Train the small byte-level BPE tokenizer shipped in sample_data/tokenizer/.

Run from anywhere:  python sample_data/make_tokenizer.py [--check]

* trains on all text in the sample_data files (deterministic, a few seconds);
* writes a Hugging Face tokenizer dir (tokenizer.json, tokenizer_config.json,
  chat_template.jinja) loadable offline with AutoTokenizer.from_pretrained;
* asserts: offline reload, ChatML rendering and assistant-token mask, exact zh+en
  round trip, no implicit special tokens, and byte-identical retraining.

--check  does not write anything; exits 1 if the committed tokenizer.json differs
         from a fresh training run (for CI).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "tokenizer"
VOCAB_SIZE = 6000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]  # ids 0..3
PAD, EOS, BOS = "<|endoftext|>", "<|im_end|>", "<s>"
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML. Each assistant turn's content + <|im_end|> is wrapped in {% generation %} so
# return_assistant_tokens_mask marks exactly the trained tokens; the "\n" after it is not.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


# ------------------------------------------------------------------------------ corpus
def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def corpus_texts() -> list[str]:
    """All text in the sample files, in a fixed order."""
    texts: list[str] = []
    with open(HERE / "pretrain_en.txt", encoding="utf-8") as f:
        texts += [line.rstrip("\n") for line in f if line.strip()]
    texts += [r["text"] for r in _jsonl(HERE / "pretrain_zh.jsonl")]
    with open(HERE / "alpaca_zh.json", encoding="utf-8") as f:
        for r in json.load(f):
            texts += [r["instruction"], r["input"], r["output"]]
    for r in _jsonl(HERE / "sharegpt_en.jsonl"):
        texts += [m["value"] for m in r["conversations"]]
    for r in _jsonl(HERE / "messages_mixed.jsonl"):
        texts += [m["content"] for m in r["messages"]]
    return [t for t in texts if t]


# ------------------------------------------------------------------------------ training
def train() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Offsets only; adds no tokens (same as Qwen2). Having a post-processor also stops
    # transformers from installing its own BOS/EOS TemplateProcessing on load.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    return tok


def tokenizer_json(tok: Tokenizer) -> str:
    """Canonical serialisation (what goes into tokenizer.json): compact, to keep the repo small."""
    return tok.to_str(pretty=False)


def save_dir(tok: Tokenizer, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        extra_special_tokens=["<|im_start|>"],  # so skip_special_tokens drops it too
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,  # only a hint; tokenmill takes max_length from the manifest
        chat_template=CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.iterdir():  # no stale files from older layouts
        if p.is_file():
            p.unlink()
    hf.save_pretrained(str(out_dir))
    # tokenizer.json exactly as trained, compact (save_pretrained writes it pretty-printed, ~2.3x larger).
    (out_dir / "tokenizer.json").write_text(tokenizer_json(tok) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------ checks
ROUND_TRIP = [
    "Hello, world! Tokenizers split text into pieces , and decode must give it back .",
    "今天天气很好，我们去公园散步吧。测试全部通过以后再合并代码！",
    "混合 mixed 文本: 3.14159 × 2 = 6.28318；emoji 🚲🍵 and rare 龘 chars.\n\n  indented\tline\r\nend",
    "def f(x):\n    return x[::-1]  # 反转\n",
    "  leading and trailing spaces  ",
]


def verify(out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3], ids
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == (PAD, EOS, BOS)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 2, 3)
    assert len(tok) == VOCAB_SIZE, len(tok)
    assert tok.chat_template == CHAT_TEMPLATE
    assert (out_dir / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE

    # no implicit special tokens
    enc = tok("hello 你好")["input_ids"]
    assert enc == tok.encode("hello 你好") == tok.encode("hello 你好", add_special_tokens=True), enc
    assert not set(enc) & {0, 1, 2, 3}, enc
    assert tok("<|im_start|>user")["input_ids"][0] == 1  # special tokens are still recognised in text
    assert sorted(tok.all_special_ids) == [0, 1, 2, 3], tok.all_special_ids
    assert tok.decode(tok.encode("<s><|im_start|>user\nhi<|im_end|>\n"), skip_special_tokens=True) == "user\nhi\n"

    # exact round trip, zh + en + bytes never seen in training
    for text in ROUND_TRIP:
        e = tok.encode(text)
        assert tok.decode(e) == text, (text, tok.decode(e))

    # chat template + assistant mask
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "把“你好”翻译成英文。"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And in French?\n"},
        {"role": "assistant", "content": "Bonjour ! 也可以说 Salut。"},
    ]
    def expect_of(ms):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in ms)

    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == expect_of(msgs), text
    gp = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert gp == expect_of(msgs[:2]) + "<|im_start|>assistant\n", gp
    # no default system prompt
    assert tok.apply_chat_template(msgs[1:2], tokenize=False) == expect_of(msgs[1:2])
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    input_ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(input_ids) and input_ids == tok.encode(text)
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    got = [tok.decode(input_ids[a:b]) for a, b in spans]
    want = [m["content"] + EOS for m in msgs if m["role"] == "assistant"]
    assert got == want, (got, want)
    assert all(input_ids[b - 1] == 2 for _, b in spans)


def main() -> int:
    check_only = "--check" in sys.argv[1:]
    tok_a, tok_b = train(), train()
    js = tokenizer_json(tok_a) + "\n"
    assert js == tokenizer_json(tok_b) + "\n", "BPE training is not deterministic"
    assert tok_a.get_vocab_size() == VOCAB_SIZE, tok_a.get_vocab_size()

    committed = OUT_DIR / "tokenizer.json"
    old = committed.read_text(encoding="utf-8") if committed.exists() else None
    if check_only:
        if old != js:
            print(f"{committed}: differs from a fresh training run; rerun {Path(__file__).name}", file=sys.stderr)
            return 1
        verify(OUT_DIR)
        print(f"{OUT_DIR}: up to date and verified")
        return 0

    # a second independent save into a temp dir must give identical files
    save_dir(tok_a, OUT_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        save_dir(tok_b, Path(tmp))
        for p in sorted(OUT_DIR.iterdir()):
            assert p.read_bytes() == (Path(tmp) / p.name).read_bytes(), f"{p.name} is not reproducible"
    verify(OUT_DIR)
    files = {p.name: p.stat().st_size for p in sorted(OUT_DIR.iterdir())}
    state = "unchanged" if old == js else ("created" if old is None else "CHANGED")
    print(f"wrote {OUT_DIR} ({state}): vocab={VOCAB_SIZE} files={files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
