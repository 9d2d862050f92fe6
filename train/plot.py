"""Training curves of a run: `python -m train.plot OUTPUT_DIR` (or `plot_run(dir)` at the end of
a run) reads OUTPUT_DIR/train_log.jsonl and writes OUTPUT_DIR/training_curves.png.

Panels: train loss (overall, and per dataset when the step lines carry
"datasets": {name: {"loss", "tokens", "samples"}}), eval loss (overall, and per dataset when
eval lines carry "eval_datasets"), and the learning rate. Each loss is drawn raw (faint) and
smoothed with LLaMA-Factory's `plot_loss` EMA, whose weight grows with the number of points.

Log shape (the trainer's contract): step lines {"step", "loss", "lr", ...}; eval lines
{"step", "eval_loss", ...}. A resumed run appends to the same log: the last line of a step wins.
No torch import here (plotting a log must be instant).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

LOG_NAME = "train_log.jsonl"
PNG_NAME = "training_curves.png"


class PlotError(Exception):
    """A one-line reason the log cannot be plotted."""


def smooth(values: list[float]) -> list[float]:
    """LLaMA-Factory's EMA: weight 1.8 * (sigmoid(0.05 n) - 0.5), started at the first value."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    last, out = values[0], []
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def read_log(output_dir: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """({step: train line}, {step: eval line}), the last line of a step winning."""
    path = Path(output_dir) / LOG_NAME
    if not path.is_file():
        raise PlotError(f"{path}: no training log (is {output_dir} the --output_dir of a run?)")
    train, evals = {}, {}
    text = path.read_text("utf-8", errors="replace").splitlines()
    for n, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(text):
                continue  # a run killed mid-write leaves a partial last line
            raise PlotError(f"{path}:{n}: not JSON [{e.msg}]") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise PlotError(f"{path}:{n}: field step missing or not an integer")
        (evals if "eval_loss" in rec else train)[rec["step"]] = rec
    if not train and not evals:
        raise PlotError(f"{path}: no step lines yet")
    return train, evals


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(lines: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    steps = [s for s in sorted(lines) if _number(lines[s].get(key))]
    return steps, [float(lines[s][key]) for s in steps]


def _per_dataset(lines: dict[int, dict], keys: tuple[str, ...], prefix: str = "") -> dict[str, tuple[list[int], list[float]]]:
    """{dataset: (steps, losses)}: a dataset's points are the steps where it trained (a loss given).
    Reads the coordinator's shape ({"loss", "tokens"}) and the trainer's ({"loss", "trained_tokens"};
    in eval lines "datasets": {"eval_loss", "eval_trained_tokens"})."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for s in sorted(lines):
        per = next((lines[s][k] for k in keys if isinstance(lines[s].get(k), dict)), {})
        for name, m in per.items():
            if not isinstance(m, dict):
                continue
            loss = m.get("loss", m.get(f"{prefix}loss"))
            tokens = m.get("tokens", m.get(f"{prefix}trained_tokens", m.get("trained_tokens", 1)))
            if _number(loss) and tokens != 0:
                steps, vals = out.setdefault(name, ([], []))
                steps.append(s)
                vals.append(float(loss))
    return dict(sorted(out.items()))


def curves(output_dir: str | Path) -> dict:
    """The plotted series, raw: {"loss": (steps, v), "lr": (steps, v), "datasets": {name: (steps, v)},
    "eval_loss": (steps, v), "eval_datasets": {name: (steps, v)}}. Without per-dataset figures in
    the log, "datasets" is {} and the overall loss stands for the run."""
    train, evals = read_log(output_dir)
    return {"loss": _series(train, "loss"), "lr": _series(train, "lr"),
            "datasets": _per_dataset(train, ("datasets",)),
            "eval_loss": _series(evals, "eval_loss"), "eval_datasets": _per_dataset(evals, ("eval_datasets", "datasets"), prefix="eval_")}


def _draw(ax, steps, values, label, color, raw_alpha=0.3):
    if not steps:
        return
    if len(steps) == 1:  # a line through one point draws nothing: a marker
        ax.plot(steps, values, color=color, label=label, marker="o", linestyle="none")
        return
    ax.plot(steps, values, color=color, alpha=raw_alpha, linewidth=1)
    ax.plot(steps, smooth(values), color=color, label=label, linewidth=1.6)


def plot_run(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves PNG (default OUTPUT_DIR/training_curves.png) and return its path."""
    import matplotlib.pyplot as plt
    fig = figure(output_dir)
    path = Path(out) if out else Path(output_dir) / PNG_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure(output_dir: str | Path):
    """The matplotlib figure of the run's curves. A dataset (task) has one colour in every panel."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    c = curves(output_dir)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys([*c["datasets"], *c["eval_datasets"]]))
    color_of = {n: palette[k % len(palette)] for k, n in enumerate(names)}
    has_eval = bool(c["eval_loss"][0] or c["eval_datasets"])
    panels = ["train"] + (["eval"] if has_eval else []) + (["lr"] if c["lr"][0] else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.4 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        if panel in ("train", "eval"):
            total = c["loss" if panel == "train" else "eval_loss"]
            per = c["datasets" if panel == "train" else "eval_datasets"]
            _draw(ax, *total, "all datasets", "black")
            for name, (steps, vals) in per.items():
                _draw(ax, steps, vals, name, color_of[name])
            ax.set_ylabel("loss")
            ax.set_title(("train" if panel == "train" else "eval") + " loss (faint: raw, solid: smoothed)")
            ax.legend(fontsize=8, loc="upper right")
        else:
            ax.plot(*c["lr"], color="tab:green")
            ax.set_ylabel("learning rate")
            ax.set_title("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


plot = plot_run  # the name an earlier draft of the trainer used


def plot_at_end(output_dir: str | Path) -> Path | None:
    """The trainer's call at the end of a run (rank 0): a plotting problem is one line, never the
    run's failure (the model is saved by then)."""
    log = logging.getLogger("train")
    try:
        path = plot_run(output_dir)
    except ImportError as e:
        log.info("no training-curves plot (%s); pip install matplotlib, then python -m train.plot %s", e, output_dir)
        return None
    except Exception as e:  # PlotError, a matplotlib fault
        log.warning("no training-curves plot: %s", " ".join(str(e).split()) or type(e).__name__)
        return None
    log.info("training curves: %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    from stages.strict_cli import StrictParser  # no abbreviations, unknown flag names the closest
    p = StrictParser(prog="python -m train.plot",
                                description="Plot loss per dataset, eval loss and lr of a training run.")
    p.add_argument("output_dir", help="the run's --output_dir (holds train_log.jsonl)")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: OUTPUT_DIR/training_curves.png)")
    a = p.parse_args(argv)
    try:
        path = plot_run(a.output_dir, a.out)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
