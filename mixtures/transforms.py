"""FM9G transform scripts (DESIGN §3 `transforms`).

A transform script is a Python file defining ``transform(data, num_sample, r) -> dict | None``
(FM9G's signature). Unlike FM9G, ``r`` is not a fresh unseeded ``random.Random()``: it is
seeded from (seed, dataset_name, record index), so a build is reproducible whatever the
worker count. Records handed to a transform are canonical dicts:

* ``{"text": str}`` for plain text,
* ``{"input": str, "output": str}`` for FM9G input-output records,
* ``{"messages": [{"role", "content", ...}], ...}`` for chats.

The record dict is handed over as is (no copy); a transform may change it in place.

Markup (stages/markup.py): the transform is called a second time, with the same ``r``, on a
copy of the record whose data strings are placeholders. When putting the data back into that
result gives the real result, the text the transform added is its own: the renderer encodes
its control-token text (FM9G's ``<|im_start|>``, ``<|im_end|>``) as control tokens, and the
data's as text. When it does not (the transform rewrites, cuts or branches on its data), the
record is unattributed: all its text is data, and it is refused (``transform_markup_unknown``)
if that text holds control-token text. A transform is therefore called twice per record; it
must not count its calls.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import random
import sys
import threading
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from stages import markup
from stages.formats import validate_canonical


# Part of a transformed dataset's cache key: bump when the markup rules (stages/markup.py)
# would give a transform's records other ids.
MARKUP_RULES = "markup-1"


def transform_cache_id(sha256: str | None) -> str | None:
    """What a dataset's cache key holds for its transform: the script's sha256 and the rules
    that turn its output into tokens (None: no transform)."""
    return None if sha256 is None else f"{sha256}:{MARKUP_RULES}"


class TransformError(RuntimeError):
    """A transform script could not be loaded, or failed on a record. ``str()`` starts with one
    line naming the script, the dataset and the record; ``traceback_text`` is the script's own
    traceback (also below that line), empty when there is none."""

    def __init__(self, message: str, traceback_text: str = ""):
        self.message, self.traceback_text = message, traceback_text
        super().__init__(message + (f"\n{traceback_text}" if traceback_text else ""))

    def __reduce__(self):  # survives pickling from worker processes
        return (type(self), (self.message, self.traceback_text))


_modules: dict[str, ModuleType] = {}  # sha256 of the source -> loaded module
_modules_lock = threading.Lock()


class Transform:
    """A loaded transform script; call it like FM9G's ``transform(data, num_sample, r)``."""

    def __init__(self, path: str, sha256: str, fn: Callable[[dict, int, random.Random], Any]):
        self.path = path
        self.sha256 = sha256
        self._fn = fn

    def __call__(self, data: dict, num_sample: int, r: random.Random) -> Any:
        return self._fn(data, num_sample, r)

    def __reduce__(self):
        # Worker processes reload the script from its file and insist on the same source.
        return (_reload, (self.path, self.sha256))

    def __repr__(self) -> str:
        return f"Transform({self.path!r}, sha256={self.sha256[:12]}…)"


def load_transform(path: str | Path) -> Transform:
    """Import a transform script. The module gets a name derived from the source hash, so
    two different scripts never clash and the same script is imported once per process."""
    path = str(Path(path).absolute())
    try:
        source = Path(path).read_bytes()
    except OSError as e:
        raise TransformError(f"cannot read transform script {path}: {e.strerror or e}") from None
    sha256 = hashlib.sha256(source).hexdigest()
    with _modules_lock:
        module = _modules.get(sha256)
        if module is None:
            module = _import(path, sha256)
            _modules[sha256] = module

    fn = getattr(module, "transform", None)
    if not callable(fn):
        raise TransformError(
            f"transform script {path} defines no function "
            "`transform(data: dict, num_sample: int, r: random.Random) -> dict | None`")
    try:
        inspect.signature(fn).bind({}, 0, random.Random())
    except TypeError as e:
        raise TransformError(
            f"transform script {path}: `transform` must accept (data, num_sample, r): {e}") from None
    except ValueError:
        pass  # builtins or C callables without a signature: trust them
    return Transform(path, sha256, fn)


def _import(path: str, sha256: str) -> ModuleType:
    name = f"tokenmill_transform_{sha256[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TransformError(f"cannot import transform script {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # lets pickle find functions defined in the script
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise TransformError(
            f"transform script {path} failed to import:\n{traceback.format_exc()}") from None
    return module


def _reload(path: str, sha256: str) -> Transform:
    transform = load_transform(path)
    if transform.sha256 != sha256:
        raise TransformError(f"transform script {path} changed since the build started")
    return transform


def record_rng(seed: int, dataset_name: str, record_index: int) -> random.Random:
    """The ``r`` a transform gets for one record: a pure function of its three arguments
    (sha256, not Python's salted ``hash()``), independent between records."""
    key = f"{seed}\x00{dataset_name}\x00{record_index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:16], "little"))


def apply_transform(
    transform: Transform | None,
    data: dict,
    *,
    seed: int,
    dataset_name: str,
    record_index: int,
    source: str,
    num_sample: int = 0,
    source_record: int | None = None,
) -> dict | None:
    """Run ``transform`` on one canonical record; None means "skip this record".

    ``record_index`` seeds ``r`` (the record's position in the dataset, 0-based); ``source``
    and ``source_record`` (default: ``record_index``) name the record in error messages as
    ``source:N`` with N 1-based (the line an editor shows, as fail-mode errors do).
    FM9G semantics: a result without ``messages``/``text`` is an input-output record, and
    a missing or empty ``output`` skips it; a missing ``input`` counts as ``""``.

    A transform that raises or calls ``sys.exit()``, or returns neither a dict nor None, is
    a TransformError (a broken script, not a bad record). A dict result is checked like an
    input record (``stages.formats.validate_canonical``): a fault there is a RecordError whose
    detail names the transform.
    """
    if transform is None:
        return data
    where = f"{source}:{(record_index if source_record is None else source_record) + 1}"
    head = f"transform {transform.path} failed on dataset {dataset_name!r}, record {where}"
    placeholders = markup.placeholder_record(data)  # before the real call, which may change data
    result = _run(transform, data, num_sample, record_rng(seed, dataset_name, record_index), head)
    if result is None:
        return None
    result = validate_canonical(result, f"output of transform {transform.path}")
    return markup.attach(result, *_markup_of(transform, placeholders, result, num_sample,
                                              record_rng(seed, dataset_name, record_index)))


def _run(transform: Transform, data: dict, num_sample: int, r: random.Random, head: str) -> dict | None:
    """One call, with FM9G's result rules applied; None: skip the record."""
    try:
        result = transform(data, num_sample, r)
    except (Exception, SystemExit) as e:
        # Show the script's frames only, not ours.
        frames = e.__traceback__
        while frames is not None and frames.tb_frame.f_code.co_filename == __file__:
            frames = frames.tb_next
        tb = "".join(traceback.format_exception(type(e), e, frames)).rstrip("\n")
        cause = (f"it called sys.exit({e.code!r})" if isinstance(e, SystemExit)
                 else f"{type(e).__name__}: {e}")
        raise TransformError(f"{head}: {cause}", tb) from None
    if result is None:
        return None
    if not isinstance(result, dict):
        raise TransformError(f"{head}: it returned {type(result).__name__}; expected a dict or None")
    if not ("messages" in result or ("text" in result and "output" not in result)):
        if not result.get("output"):
            return None
        if "input" not in result:
            result = {**result, "input": ""}
    return result


def _markup_of(transform: Transform, placeholders, result: dict, num_sample: int, r: random.Random):
    """(markup, why) of ``result``: the transform run again on the placeholder copy of its
    input, with the same ``r`` (stages/markup.py); markup None (and why) when that cannot show
    which text the transform wrote."""
    if placeholders is None:
        return None, "was given data holding reserved characters"
    ph_data, values = placeholders
    try:
        ph_result = _run(transform, ph_data, num_sample, r, "")
        if ph_result is not None:
            ph_result = validate_canonical(ph_result, "")
    except (Exception, SystemExit):  # it cannot run on placeholders: it reads its data's value
        return None, "fails on placeholder data (it reads the data's value)"
    if ph_result is None:
        return None, "skips placeholder data (it reads the data's value)"
    found = markup.derive(ph_result, result, values)
    if found is None:
        return None, "rewrites, cuts or branches on its data"
    return found, ""
