"""`pipeline build --check-template N`: compare the first N samples of every chat dataset with
the reference before anything is built.

For each dataset of the mixture (to build *and* reused: a reused dataset is in the mixture
too, and checking N records costs little), the first N records that adapt — and pass the
dataset's transform — are taken in source order exactly as the workers read them, rendered
and tokenized by tokenmill (`stages.render.Renderer`, as the workers do) and by the
reference: transformers' own chat-template renderer with the tokenizer's own encoding, i.e.
`tokenizer.apply_chat_template` (`stages.template_check.check_template`). Any difference in ids or in
trained positions stops the build with exit status 1 before a single work unit runs; the
message names the dataset, the record (file:record) and what differs. Samples are compared
before the overflow policy (which only cuts ids and spans).

Which template is the reference (`against`):
* ``tokenizer`` (default): the tokenizer's own chat template — what
  `tokenizer.apply_chat_template(messages)` gives. So a built-in or a `.jinja` file that
  drifts from the model's template fails. Where there is nothing to compare the layout with
  — the tokenizer has no chat template, or the template is ``none`` (FM9G's plain BOS +
  prompt + response + EOS, not a chat template) — the build's own template is the reference
  and the summary line says so: tokenmill's rendering, encoding and loss spans are checked,
  not the layout.
* ``template``: always the build's own template (`apply_chat_template(...,
  chat_template=<its text>)`), for a template that deliberately differs from the tokenizer's.

Text-format datasets have no template and are skipped (said so). Records that fail to adapt
or that the transform skips are passed over (the build itself reports them); records the
renderer refuses or where the reference cannot decide are counted as "not checked".
"""
from __future__ import annotations

import ast
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from mixtures.transforms import TransformError
from stages.errors import BuildError
from stages.jinja_env import ChatTemplate
from stages.render import Renderer
from stages.template_check import TemplateCheck, check_template

from .sampling import sample_records

AGAINST = ("tokenizer", "template")
_IDS_RE = re.compile(r"ours (\[[\d, ]*\]) reference (\[[\d, ]*\])")
SCAN_FACTOR = 10  # read at most max(N × this, 1000) records looking for N good ones


@dataclass
class DatasetCheck:
    """The --check-template result of one dataset (kept on its DatasetPlan for the summary)."""
    dataset: str
    status: str  # ok | differ | skipped | unchecked
    reference: str  # what the samples were compared with (short)
    note: str = ""  # why that reference
    report: TemplateCheck | None = None
    where: list = field(default_factory=list)  # (file, record) of each checked record
    passed_over: dict = field(default_factory=dict)  # {reason: n} records not taken
    tok: object = field(default=None, repr=False)  # to show differing ids as text

    @property
    def short(self) -> str:
        """One cell of the summary table."""
        r = self.report
        if self.status == "skipped":
            return "skipped (text)"
        if self.status == "differ":
            return f"DIFFERS ({len(r.differ)})"
        if self.status == "unchecked":
            return "nothing checked"
        return f"ok {r.ids_equal}/{r.checked} ids, {r.masks_equal}/{r.masks_checked} masks"

    def lines(self) -> list[str]:
        """The lines printed for this dataset: summary, then each difference with its record."""
        head = f"check-template {self.dataset}: "
        if self.status == "skipped":
            return [head + "skipped: text format (documents, no chat template; every token trains)"]
        r = self.report
        first = r.summary().splitlines()[0] if r.checked or r.not_checked or r.differ else \
            f"template {r.template!r}: no record to check"
        out = [head + first, f"  reference: {self.reference}" + (f" — {self.note}" if self.note else "")]
        if self.passed_over:
            out.append("  passed over (the build reports these): "
                       + ", ".join(f"{k} {v}" for k, v in sorted(self.passed_over.items())))
        if self.status == "unchecked":
            out.append("  warning: no sample could be compared with the reference")
        for idx, what, detail in r.differ[:10]:
            out.append(f"  {self._loc(idx)}: {what} differ — {self._decoded(detail)}")
        if len(r.differ) > 10:
            out.append(f"  … and {len(r.differ) - 10} more")
        return out

    def _decoded(self, detail: str) -> str:
        """check_template names differing ids; add what they read as."""
        m = _IDS_RE.search(detail)
        if self.tok is None or m is None:
            return detail
        try:
            ours, ref = (self.tok.decode(ast.literal_eval(g)) for g in m.groups())
        except Exception:
            return detail
        return f"{detail}; as text: ours {ours!r} vs reference {ref!r}"

    def _loc(self, idx: int) -> str:
        file, rec = self.where[idx]
        return f"{file}:{rec + 1}"

    def failure(self) -> str:
        idx, what, detail = self.report.differ[0]
        more = f" (and {len(self.report.differ) - 1} more)" if len(self.report.differ) > 1 else ""
        return (f"dataset {self.dataset!r}: {self._loc(idx)}: {what} differ from the reference "
                f"({self.reference}) — {self._decoded(detail)}{more}")


def reference_for(tok, template: ChatTemplate, template_setting: str, against: str
                  ) -> tuple[ChatTemplate | None, str, str]:
    """→ (reference template for check_template — None: the build's own —, what it is, why)."""
    if against not in AGAINST:
        raise BuildError(f"unknown --check-against {against!r}: {', '.join(AGAINST)}")
    apply = "tokenizer.apply_chat_template"
    own = f"the build's template {template.name!r} through apply_chat_template(chat_template=…)"
    if template_setting == "tokenizer":
        return None, apply, "the tokenizer's own chat template"
    if against == "template":
        return None, own, "--check-against template: the layout itself is not compared"
    if template_setting == "none":
        return None, own, ("template 'none' is plain text, not a chat template, so its layout has "
                           "no reference; ids and trained positions are checked")
    if not tok.chat_template:
        return None, own, ("the tokenizer has no chat template of its own, so the layout has no "
                           "reference; ids and trained positions are checked")
    if tok.chat_template == template.text:
        return None, apply, f"{template.name!r} is the same text as the tokenizer's own chat template"
    return (ChatTemplate("tokenizer", tok.chat_template), apply,
            f"the tokenizer's own chat template, not {template.name!r} "
            "(--check-against template compares with the build's template instead)")


def first_records(plan, n: int) -> tuple[list[dict], list[tuple[str, int]], Counter]:
    """The first n records of a dataset as the workers see them: read, adapted, transformed."""
    try:
        got = sample_records(plan.job, plan.units, n, scan=max(n * SCAN_FACTOR, 1000))
    except TransformError as e:
        raise BuildError(f"--check-template: dataset {plan.job.dataset_name!r}: {e}") from None
    return got.records, got.where, got.passed


def check_dataset(plan, tok, template: ChatTemplate, template_setting: str, n: int,
                  against: str = "tokenizer") -> DatasetCheck:
    name = plan.spec.dataset_name
    if plan.job.format.is_text:
        return DatasetCheck(name, "skipped", "none (text format)")
    reference, described, note = reference_for(tok, template, template_setting, against)
    records, where, passed = first_records(plan, n)
    renderer = Renderer(tok, template, plan.job.loss,  # as the workers build it
                        template_kwargs=json.loads(plan.job.template_kwargs) if plan.job.template_kwargs else None)
    report = check_template(renderer, records, reference)
    status = "differ" if report.differ else ("ok" if report.checked else "unchecked")
    return DatasetCheck(name, status, described, note, report, where, dict(passed), tok)


def check_datasets(plans, mixture, tok, template: ChatTemplate, n: int, against: str = "tokenizer",
                   log=print) -> list[DatasetCheck]:
    """Check every dataset, print its lines, keep the result on its plan (`template_check`);
    raise BuildError naming every differing dataset (the build then stops, exit 1)."""
    if n < 1:
        raise BuildError(f"--check-template needs a number of samples >= 1, got {n}")
    results = []
    for plan in plans:
        result = check_dataset(plan, tok, template, mixture.template, n, against)
        plan.template_check = result
        for line in result.lines():
            log(line)
        results.append(result)
    bad = [r for r in results if r.status == "differ"]
    if bad:
        raise BuildError(f"--check-template {n}: {len(bad)} dataset(s) differ from the reference; "
                         "nothing was built:\n  " + "\n  ".join(r.failure() for r in bad))
    return results
