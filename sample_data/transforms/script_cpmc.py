"""Pretraining records for FM9G input-output training (tokenmill's script_cpmc.py).

Same behaviour as the script_cpmc.py in the FM9G README: pass ``input``/``output`` through,
a missing field counting as ``""`` (an empty input means "train on every output token",
FM9G's pretraining convention). It also accepts tokenmill's plain-text record
``{"text": ...}`` and turns it into ``{"input": "", "output": text}``.

A record whose output is empty or only whitespace returns None (skipped and counted);
FM9G dropped empty outputs later, in its loader. ``r`` is not used, as in FM9G.
"""
import random


def transform(data, num_sample: int, r: random.Random):
    _input = data.get("input", "")
    _output = data.get("output", data.get("text", ""))
    if not _output or not _output.strip():
        return None
    return {"input": _input, "output": _output}
