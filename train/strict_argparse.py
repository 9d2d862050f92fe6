"""An argparse parser for the train.* tools: no abbreviations (`allow_abbrev=False`: `--input`
is not `--input_dir`), and an unknown flag is a usage error (exit 2) naming the closest real one
(checked before anything else, so a misspelt required flag is named as such)."""
from __future__ import annotations

import argparse
import difflib
import sys


class StrictParser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw["allow_abbrev"] = False
        super().__init__(*args, **kw)

    def closest(self, flag: str) -> str | None:
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        close = [k for k in known if k.startswith(flag)][:1] or difflib.get_close_matches(flag, known, n=1, cutoff=0.5)
        return close[0] if close else None

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        known = {s for a in self._actions for s in a.option_strings}
        for word in argv:
            if word == "--":
                break
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                near = self.closest(flag)
                self.error(f"unrecognized argument {flag}" + (f" (did you mean {near}?)" if near else ""))
        return super().parse_args(argv, namespace)
