"""Record-level faults. Every bad record is either fatal (with file, record and field named)
or counted and set aside by reason — never silently dropped."""
from __future__ import annotations


# Records set aside because the user's own policy says so (a transform returning None,
# overflow: drop / truncate leaving nothing to train): counted in meta.json, never fatal.
POLICY_REASONS = frozenset({"transform_skipped", "too_long", "no_trained_tokens_after_truncation"})


class RecordError(ValueError):
    """A record that cannot become a sample. `reason` is a short stable key used for the
    `skipped` counts in meta.json; `detail` is the human message.

    Numbering: `record` is 0-based inside the code (as `source_record` in shards); every
    number shown to a user is 1-based — `FILE:N` here and the `line` field of rejects.jsonl —
    the line an editor shows (docs/formats.md)."""

    def __init__(self, reason: str, detail: str, *, source: str | None = None,
                 record: int | None = None, field: str | None = None):
        self.reason, self.detail = reason, detail
        self.source, self.record, self.field = source, record, field
        super().__init__(str(self))

    def __reduce__(self):  # picklable across worker processes (default would lose fields)
        return (_rebuild, (self.reason, self.detail, self.source, self.record, self.field))

    def located(self, source: str, record: int) -> "RecordError":
        self.source, self.record = source, record
        self.args = (str(self),)
        return self

    def __str__(self) -> str:
        where = f"{self.source}:{self.record + 1}" if self.source is not None else "<record>"
        field = f" field '{self.field}'" if self.field else ""
        return f"{where}:{field} {self.detail} [{self.reason}]"


def _rebuild(reason, detail, source, record, field):
    return RecordError(reason, detail, source=source, record=record, field=field)


class BuildError(RuntimeError):
    """A fault that stops a build (bad source, bad configuration)."""
