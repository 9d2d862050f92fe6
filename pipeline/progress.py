"""Progress on stderr: one bar per dataset being built — source bytes done (so the ETA is
that of the whole dataset), records read, tokens/s — off when stderr is not a terminal."""
from __future__ import annotations

import os
import sys
import time


def unit_bytes(unit) -> int:
    """Source bytes a unit covers (0 for a directory unit, e.g. an FM9G index dir)."""
    if unit.end >= 0:
        return unit.end - unit.start
    return os.path.getsize(unit.file) if os.path.isfile(unit.file) else 0


class Progress:
    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bars, self.records, self.tokens, self.units, self.t0 = {}, {}, {}, {}, time.perf_counter()

    def start(self, plans):
        if not self.enabled:
            return
        from tqdm import tqdm
        self.t0 = time.perf_counter()
        for i, p in enumerate(x for x in plans if x.status == "build"):
            name = p.spec.dataset_name
            self.units[name] = p.units  # the plan's own list: nothing per unit is copied here
            self.bars[name] = tqdm(total=sum(unit_bytes(u) for u in p.units), desc=name, unit="B", unit_scale=True,
                                   position=i, leave=True, file=sys.stderr)
            self.records[name] = self.tokens[name] = 0

    def advance(self, name: str, summary: dict):
        bar = self.bars.get(name)
        if bar is None:
            return
        self.records[name] += summary["records_read"]
        self.tokens[name] += summary["n_tokens"]
        rate = self.tokens[name] / max(time.perf_counter() - self.t0, 1e-9)
        bar.set_postfix(records=f"{self.records[name]:,}", tok_s=f"{rate / 1e6:.2f}M", refresh=False)
        units = self.units[name]
        k = summary["unit"]
        bar.update(unit_bytes(units[k]) if 0 <= k < len(units) and units[k].index == k else 0)

    def close(self):
        for bar in self.bars.values():
            bar.close()
