"""A template's control strings (`<|name|>`, `<｜name｜>`) must be single tokens of the tokenizer.

Written as plain text they would train the wrong tokens and the first trained token would
straddle the boundary (hy3 on the Qwen2.5 tokenizer). The strings are found in the template's
literal text and in what it renders for probe conversations (a template may assemble them from
parts, as hy3 does with its token suffix)."""
from __future__ import annotations

import json
import re
from functools import lru_cache

from .errors import BuildError
from .jinja_env import ChatTemplate, compile_template, template_literal_text

# what a chat template's control strings look like: <|name|>, and Hunyuan/DeepSeek's <｜name｜>
CONTROL_STRING_RE = re.compile(r"<\|[^<>|\s]{1,80}\|>|<｜[^<>｜\s]{1,80}｜>")
# conversations rendered to find control strings a template assembles from parts ('<｜x' + sfx + '｜>')
PROBES = (
    [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "a", "reasoning_content": "r"}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
)


@lru_cache(maxsize=32)
def control_strings(text: str, kwargs_json: str) -> list[str]:
    """The control strings of a template: in its literal text, and in what it renders for
    probe conversations (under every reasoning_effort); a probe the template refuses is skipped."""
    found = set(CONTROL_STRING_RE.findall(template_literal_text(text)))
    compiled = compile_template(text, False)
    kwargs = json.loads(kwargs_json)
    for probe in PROBES:
        for effort in (None, "high", "no_think"):
            kw = kwargs if effort is None else {**kwargs, "reasoning_effort": effort}
            try:
                out = compiled.render(messages=probe, tools=None, documents=None, add_generation_prompt=False, **kw)
            except Exception:
                continue
            found |= set(CONTROL_STRING_RE.findall(out))
    return sorted(found)


def check_control_strings(template: ChatTemplate, tokenizer) -> None:
    """BuildError naming the first control string of `template` that is not one token."""
    missing = [s for s in control_strings(template.text, json.dumps(tokenizer.template_kwargs(), sort_keys=True))
               if s not in tokenizer.control_tokens]
    if missing:
        raise BuildError(f"template {template.name!r} writes {missing[0]!r}, which is not one token of the "
                         f"tokenizer {tokenizer.path}" + (f" (nor {', '.join(map(repr, missing[1:4]))})"
                                                          if len(missing) > 1 else "")
                         + ": this template is for another tokenizer's control tokens")
