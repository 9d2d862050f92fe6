"""Progress on stderr: one bar per dataset being built (records, tokens/s, ETA), off when
stderr is not a terminal."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bars, self.tokens, self.t0 = {}, {}, time.perf_counter()

    def start(self, plans):
        if not self.enabled:
            return
        from tqdm import tqdm
        for i, p in enumerate(x for x in plans if x.status == "build"):
            self.bars[p.spec.dataset_name] = tqdm(total=len(p.units), desc=p.spec.dataset_name,
                                                  unit="unit", position=i, leave=True, file=sys.stderr)
            self.tokens[p.spec.dataset_name] = 0

    def advance(self, name: str, summary: dict):
        bar = self.bars.get(name)
        if bar is None:
            return
        self.tokens[name] += summary["n_tokens"]
        rate = self.tokens[name] / max(time.perf_counter() - self.t0, 1e-9)
        bar.set_postfix(records=summary["records_read"], tok_s=f"{rate / 1e6:.2f}M")
        bar.update(1)

    def close(self):
        for bar in self.bars.values():
            bar.close()
