"""The one argparse parser class of every tokenmill command line (`pipeline`, `train`, the
`train.*` tools): no flag is ever silent.

argparse's default `allow_abbrev=True` rewrites a prefix into the one flag it starts
(`--dataset demo` became `--dataset_dir demo`, `pipeline build --work 1` became `--workers 1`):
the run goes on with a setting the user never wrote. Here abbreviations are off in the parser
and every sub-parser, and an unknown flag is a usage error (exit 2) naming the closest real
flags of the command that was run (a flag it is a prefix of, else difflib's nearest).
"""
from __future__ import annotations

import argparse
import difflib


def _option_strings(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The long/short flags of `parser` and of the sub-command argv names (all of them when
    none is named)."""
    out = list(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = [name for name in action.choices if name in argv] or list(action.choices)
            for name in chosen:
                out += _option_strings(action.choices[name], argv)
    return list(dict.fromkeys(s for s in out if s not in ("-h", "--help")))


def closest_flags(flag: str, candidates: list[str], n: int = 3) -> list[str]:
    """Real flags `flag` abbreviates (what argparse would have guessed), else the nearest names."""
    flag = flag.split("=", 1)[0]
    prefixed = [c for c in candidates if c.startswith(flag) and c != flag]
    if prefixed:
        return sorted(prefixed, key=len)[:n]
    norm = lambda s: s.lstrip("-").replace("-", "_")  # noqa: E731  (--max-length ~ --max_length)
    by_norm = {norm(c): c for c in candidates}
    near = difflib.get_close_matches(norm(flag), list(by_norm), n=n, cutoff=0.6)
    return [by_norm[m] for m in near]


class StrictParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with `allow_abbrev=False` (sub-parsers inherit the class) and an
    unknown-flag error that names the closest real flag."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        import sys
        self._argv_seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def unknown_flags_message(self, extras: list[str]) -> str | None:
        flags = [a for a in extras if a.startswith("-") and len(a) > 1 and not _is_number(a)]
        if not flags:
            return None
        candidates = _option_strings(self, getattr(self, "_argv_seen", []))
        parts = []
        for f in flags:
            near = closest_flags(f, candidates)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            parts.append(f"unknown flag {f.split('=', 1)[0]}{hint}")
        return "; ".join(parts) + " — flags are never abbreviated"

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown_flags_message(extras) or f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def error(self, message):
        """An unknown flag is named first, even when argparse stopped at a missing one (a mistyped
        required flag is missing *because* it was mistyped)."""
        argv = getattr(self, "_argv_seen", [])
        known = set(_option_strings(self, argv))
        unknown = [a for a in argv if a.startswith("--") and len(a) > 2 and a.split("=", 1)[0] not in known]
        if unknown and not message.startswith("unknown flag"):
            message = self.unknown_flags_message(unknown) or message
        super().error(message)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
