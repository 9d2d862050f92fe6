"""Chat templates: where they come from, and the sandbox they render in.

A template is `tokenizer` (the tokenizer's own), a built-in (a file in stages/templates/: a
.jinja placed there is a built-in everywhere) or a path to a .jinja file. Templates render in
a sandboxed Jinja environment equal to transformers' chat-template one (same filters and
globals, trim_blocks/lstrip_blocks), except that `strftime_now` reads a fixed time (template
variable `tokenmill_now`, ISO format; default 2025-01-01T00:00:00), so builds are
reproducible. Nothing here knows a tokenizer's classes: `resolve_template` only reads
`.chat_template` and `.path` of the one it is given.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .constants import builtin_templates
from .errors import BuildError, RecordError

# Unicode noncharacters (never in real text): placeholder brackets, generation-block marks.
PH_OPEN, PH_CLOSE, GEN_OPEN, GEN_CLOSE = "\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3"
PIECE_BREAK = "\ufdd5"  # template variable `piece_break`: a token boundary, no token
RESERVED_RE = re.compile("[\ufdd0-\ufdd5]")
DEFAULT_NOW = "2025-01-01T00:00:00"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def has_generation_blocks(self) -> bool:
        return re.search(r"\{%-?\s*generation\s*-?%\}", self.text) is not None


def available_templates() -> list[str]:
    return builtin_templates()


def find_template(name: str, tokenizer) -> ChatTemplate:
    """`tokenizer` (the tokenizer's own), a built-in name, or a path to a .jinja file; compiled
    once here so a broken template stops the build before any record. A LLaMA-Factory name
    (`qwen3`, `llama3`, `hy_v3`, ...) is resolved for this tokenizer first (stages/lf_names.py)."""
    from .lf_names import LFTemplateError, resolve_lf_name
    try:
        name, note = resolve_lf_name(name, tokenizer.chat_template)
    except LFTemplateError as e:
        raise BuildError(str(e)) from None
    if note:
        import logging
        logging.getLogger("stages").warning("%s", note)
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise BuildError(f"{tokenizer.path}: template 'tokenizer' asked for, but the tokenizer "
                             f"has no chat template; choose one of {', '.join(available_templates())}")
        tmpl = ChatTemplate("tokenizer", tokenizer.chat_template)
    elif Path(name).suffix == ".jinja" or "/" in name:
        if not Path(name).is_file():
            raise BuildError(f"template file {name!r} not found")
        tmpl = ChatTemplate(Path(name).stem, Path(name).read_text(encoding="utf-8"))
    else:
        res = resources.files("stages") / "templates" / f"{name}.jinja"
        if not res.is_file():
            raise BuildError(f"unknown template {name!r}: use tokenizer, {', '.join(available_templates())} "
                             "or a path to a .jinja file")
        tmpl = ChatTemplate(name, res.read_text(encoding="utf-8"))
    try:
        compile_template(tmpl.text, False)
    except Exception as e:
        raise BuildError(f"template {tmpl.name!r} does not compile: {type(e).__name__}: {e}") from None
    return tmpl


@lru_cache(maxsize=32)
def compile_template(text: str, mark_generation: bool):
    """The template compiled in a sandbox equal to transformers' chat-template environment.
    With `mark_generation`, `{% generation %}` blocks wrap their output in GEN marks."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

        def _block(self, caller):
            out = caller()
            return f"{GEN_OPEN}{out}{GEN_CLOSE}" if mark_generation else out

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    @jinja2.pass_context
    def strftime_now(ctx, fmt):
        return datetime.fromisoformat(ctx.get("tokenmill_now") or DEFAULT_NOW).strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=TemplateNamespace, piece_break=PIECE_BREAK)
    return env.from_string(text)


@lru_cache(maxsize=32)
def template_literal_text(text: str) -> str:
    """The template's literal strings (raw text and string constants), joined by NULs — where
    transformers looks for a template's control tokens."""
    from jinja2 import nodes
    tmpl = compile_template(text, False)
    ast = tmpl.environment.parse(text)
    literals = {n.data for n in ast.find_all(nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(literals))


def render(template: ChatTemplate, messages, tools, extra: dict, mark: bool, add_gen: bool) -> str:
    """One render; a template failure is the record's (RecordError template_error)."""
    try:
        return compile_template(template.text, mark).render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_gen, **extra)
    except Exception as e:
        raise RecordError("template_error", f"chat template {template.name!r} failed: "
                          f"{type(e).__name__}: {e}") from None
