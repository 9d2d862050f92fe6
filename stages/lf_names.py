"""LLaMA-Factory template names (`template: qwen3` in an LF YAML or a manifest) -> a tokenmill template.

LF's templates (`data/template.py`) are Python layouts of a model family's chat format; the
faithful rendering of that format is the tokenizer's own chat template, which the family ships.
So an LF name resolves to:
  1. `tokenizer` (the tokenizer's own template) when it has one — with a note when the name's
     family and the tokenizer's template visibly disagree (e.g. `llama3` on a Qwen tokenizer);
  2. else our built-in template of that family (stages/templates/: chatml, hunyuan, hy3), with a note;
  3. else a one-line error naming the name and what to do.
`empty` is LF's plain concatenation: our `none`, whatever the tokenizer has. Our own template
names (tokenizer, chatml, hunyuan, hy3, none) and .jinja paths keep their meaning where a
manifest or `--template` names them; an LF config file asks for the LF meaning (`lf=True`).
"""
from __future__ import annotations

# LF name -> family. A family is recognised in a tokenizer's template by a marker string.
LF_TEMPLATES = {
    "qwen": "chatml", "qwen2_vl": "chatml", "qwen3": "chatml", "qwen3_nothink": "chatml", "chatml": "chatml",
    "chatml_de": "chatml", "yi": "chatml", "intern2": "chatml", "intern3": "chatml", "marco": "chatml",
    "hunyuan": "hunyuan", "hy3": "hy3", "hy_v3": "hy3", "hunyuan_small": "hy_dense",
    "hy_dense_1_8b": "hy_dense", "hy_dense_7b": "hy_dense",
    "llama3": "llama3", "llama2": "inst", "mistral": "inst", "ministral": "inst",
    "glm4": "glm4", "chatglm3": "glm4", "deepseek3": "deepseek", "deepseekr1": "deepseek", "deepseek": "deepseek",
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "phi": "phi", "phi_small": "phi", "phi4": "phi4",
    "default": "default", "empty": "empty",
}
FAMILY_MARKERS = {
    "chatml": "<|im_start|>", "hunyuan": "<|extra_0|>", "hy3": "<｜hy_User｜>", "hy_dense": "<｜hy_User｜>",
    "llama3": "<|start_header_id|>", "inst": "[INST]", "glm4": "[gMASK]", "deepseek": "<｜User｜>",
    "gemma": "<start_of_turn>", "phi": "<|end|>", "phi4": "<|im_sep|>",
}
FAMILY_BUILTIN = {"chatml": "chatml", "hunyuan": "hunyuan", "hy3": "hy3", "empty": "none"}
OUR_NAMES = ("tokenizer", "chatml", "hunyuan", "hy3", "none")


class LFTemplateError(ValueError):
    """An LF template name that cannot be honoured (one line)."""


def is_lf_name(name: str) -> bool:
    return name in LF_TEMPLATES


def _family_of(chat_template: str) -> str | None:
    found = [fam for fam, marker in FAMILY_MARKERS.items() if marker in chat_template]
    if "phi4" in found:
        return "phi4"
    return found[0] if found else None


def resolve_lf_name(name: str, chat_template: str | None, lf: bool = False) -> tuple[str, str | None]:
    """-> (tokenmill template name or path, a note or None). Not an LF name (a path, one of ours
    unless `lf`): returned as it is. Raises LFTemplateError where nothing fits."""
    if name not in LF_TEMPLATES or (name in OUR_NAMES and not lf):
        return name, None
    family = LF_TEMPLATES[name]
    if family == "empty":
        return "none", None
    if chat_template:
        seen = _family_of(chat_template)
        want = FAMILY_MARKERS.get(family)
        note = None
        if want is not None and want not in chat_template:
            note = (f"template {name!r} (LLaMA-Factory, {family} family) asked for, but the tokenizer's own chat "
                    f"template is {'of the ' + seen + ' family' if seen else 'another format'}: building with the "
                    "tokenizer's template (the model's own format)")
        return "tokenizer", note
    builtin = FAMILY_BUILTIN.get(family)
    if builtin is None:
        raise LFTemplateError(f"template {name!r} (LLaMA-Factory): the tokenizer has no chat template and tokenmill "
                              f"has no built-in {family} template; use a tokenizer that ships its chat template, or "
                              f"one of {', '.join(OUR_NAMES)} or a .jinja file")
    return builtin, (f"template {name!r} (LLaMA-Factory): the tokenizer has no chat template; using tokenmill's "
                     f"built-in {builtin!r} ({family} family)")
