"""A column mapping that names a key no record has is refused (LLaMA-Factory refuses it too).

``{"columns": {"system": "sys_prompt_typo"}}`` over a file without that key would otherwise
build every sample without its system prompt, exit 0. Before a mapped dataset is built its
records are read in order until every mapped key has been seen — one record when the mapping
is right — and a key seen in no record of the source is a BuildError naming the key, its
column and the files. A key missing from *some* records is a per-record matter: a required
column (stages/columns.REQUIRED) is then a counted ``missing_field``; an optional one (system,
tools, history, query) is that part left out, as LLaMA-Factory leaves it.
"""
from __future__ import annotations

from typing import Iterable

from .errors import BuildError
from .readers import WorkUnit, iter_unit


def check_mapped_keys(dataset_name: str, columns: dict[str, str], units: Iterable[WorkUnit]) -> None:
    """Raise BuildError when a file key that ``columns`` (column → file key) maps is in no
    JSON-object record of ``units``."""
    wanted = {key: col for col, key in columns.items()}
    if not wanted:
        return
    files: list[str] = []
    for unit in units:
        if unit.file not in files:
            files.append(unit.file)
        for _, raw in iter_unit(unit):
            if isinstance(raw, dict):
                for key in [k for k in wanted if k in raw]:
                    del wanted[key]
                if not wanted:
                    return
    where = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, …)"
    key, col = next(iter(wanted.items()))
    more = f" (and {', '.join(repr(k) for k in list(wanted)[1:])})" if len(wanted) > 1 else ""
    raise BuildError(f"{dataset_name}: the column mapping names key {key!r} (columns.{col}){more}, "
                     f"which no record of {where} has; fix the mapping (the file's keys are case-sensitive)")
