"""Chat template for FM9G input-output records (tokenmill's add_template.py).

Same purpose as FM9G's README add_template.py: wrap ``input`` in a ChatML system + user
prompt and close ``output`` with the end-of-turn token, so a record trained as
``[BOS] + input + output`` (loss on ``output`` + EOS) looks like one assistant turn:

    input  -> "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"
              "<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n"
    output -> "{output}<|im_end|>"

Differences from FM9G's script:
* the user role is "user" (lower case). FM9G writes "User", a bug: ChatML chat templates
  (ours included) render "user", so FM9G-trained prompts never match inference prompts;
* a record with ``input`` and a missing or empty ``output`` is skipped (FM9G raises
  KeyError on a missing one and trains on a lone "<|im_end|>" for an empty one);
* a plain-text record ``{"text": ...}`` is passed on as pretraining text, like FM9G's
  output-only branch.

``r`` (a per-record seeded random.Random) is not used.
"""
import random

SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT = (
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
END_OF_TURN = "<|im_end|>"


def transform(data, num_sample: int, r: random.Random):
    if "input" in data:
        output = data.get("output") or ""
        if not output:
            return None  # nothing to train on
        return {"input": PROMPT.format(data["input"]), "output": output + END_OF_TURN}
    if "output" in data:  # output-only: pretraining text, no template
        return {"input": "", "output": data["output"]}
    if "text" in data:
        return {"input": "", "output": data["text"]}
    return None
