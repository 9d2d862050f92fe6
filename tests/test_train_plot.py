"""train.plot: the curves PNG of a run's train_log.jsonl (per-dataset loss, eval loss, lr)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.plot import PNG_NAME, curves, plot_run, smooth

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log(tmp_path: Path, with_datasets: bool = True) -> tuple[Path, list[dict]]:
    """A synthetic log: 30 steps, two datasets (`code` absent from every third step), evals every
    10 steps, and step 12 logged twice (a resume re-ran it: the second line wins)."""
    rng = np.random.default_rng(0)
    lines = []
    for step in range(1, 31):
        rec = {"step": step, "loss": 3.0 - 0.05 * step + rng.normal(0, 0.1), "lr": 1e-3 * (1 - step / 31),
               "grad_norm": 1.0}
        if with_datasets:
            ds = {"chat": {"loss": rec["loss"] + 0.2, "tokens": 100 + step, "samples": 3}}
            if step % 3:
                ds["code"] = {"loss": rec["loss"] - 0.3, "tokens": 50, "samples": 1}
            rec["datasets"] = ds
        lines.append(rec)
        if step % 10 == 0:
            ev = {"step": step, "eval_loss": 2.5 - 0.02 * step, "eval_tokens": 400}
            if with_datasets:
                ev["eval_datasets"] = {"chat": {"loss": 2.6 - 0.02 * step, "tokens": 300},
                                       "code": {"loss": 2.2 - 0.02 * step, "tokens": 100}}
            lines.append(ev)
    redo = dict(lines[12], loss=9.0)  # index 12 = step 12 (after the eval line of step 10)
    assert redo["step"] == 12
    if with_datasets:
        redo["datasets"] = {"chat": {"loss": 9.5, "tokens": 7, "samples": 1}}
    lines.append(redo)
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return out, lines


def _expected(lines: list[dict], group: str, name: str | None) -> tuple[list, list]:
    """Independent recomputation with numpy from the raw lines: last line per step wins."""
    key = "eval_loss" if group == "eval" else "loss"
    by_step = {}
    for r in lines:
        if ("eval_loss" in r) == (group == "eval"):
            by_step[r["step"]] = r
    steps = np.array(sorted(by_step))
    if name is None:
        return steps.tolist(), [by_step[s][key] for s in steps]
    field = "eval_datasets" if group == "eval" else "datasets"
    keep = steps[[name in by_step[s].get(field, {}) for s in steps]]
    return keep.tolist(), [by_step[s][field][name]["loss"] for s in keep]


def _is_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image
    img = matplotlib.image.imread(path)  # decodes the whole image: a truncated file fails here
    return img.shape[:2]


def test_png_and_series_equal_the_log(tmp_path):
    out, lines = _log(tmp_path)
    png = plot_run(out)
    assert png == out / PNG_NAME
    h, w = _is_png(png)
    assert h > 300 and w > 300
    c = curves(out)
    assert set(c["datasets"]) == {"chat", "code"} and set(c["eval_datasets"]) == {"chat", "code"}
    for name in ("chat", "code"):
        steps, vals = c["datasets"][name]
        exp_steps, exp_vals = _expected(lines, "train", name)
        assert steps == exp_steps
        np.testing.assert_array_equal(vals, exp_vals)
        steps, vals = c["eval_datasets"][name]
        exp_steps, exp_vals = _expected(lines, "eval", name)
        assert steps == exp_steps == [10, 20, 30]
        np.testing.assert_array_equal(vals, exp_vals)
    # step 12's second line wins: `code` is absent there, `chat` is 9.5
    assert 12 not in c["datasets"]["code"][0]
    assert c["datasets"]["chat"][1][c["datasets"]["chat"][0].index(12)] == 9.5
    assert c["datasets"]["code"][0] == [s for s in range(1, 31) if s % 3 and s != 12]
    steps, vals = c["loss"]
    exp_steps, exp_vals = _expected(lines, "train", None)
    assert steps == exp_steps == list(range(1, 31))
    np.testing.assert_array_equal(vals, exp_vals)
    assert c["lr"][0] == list(range(1, 31))


def test_smoothing_is_llama_factory_ema():
    x = np.random.default_rng(1).normal(size=40)
    w = 1.8 * (1 / (1 + np.exp(-0.05 * len(x))) - 0.5)
    exp = np.empty_like(x)
    last = x[0]
    for i, v in enumerate(x):
        last = exp[i] = w * last + (1 - w) * v
    np.testing.assert_allclose(smooth(list(x)), exp, rtol=0, atol=1e-12)
    assert smooth([]) == []


def test_trainer_log_shape(tmp_path):
    """The trainer's own per-dataset shape: "trained_tokens" and, in eval lines, "datasets" with
    eval_-prefixed keys; a dataset with no tokens in a step (loss None) has no point there."""
    out = tmp_path / "run"
    out.mkdir()
    lines = [{"step": 1, "loss": 3.0, "lr": 1e-3,
              "datasets": {"a": {"samples": 2, "trained_tokens": 10, "loss": 3.5},
                           "b": {"samples": 0, "trained_tokens": 0, "loss": None}}},
             {"step": 2, "loss": 2.0, "lr": 1e-3,
              "datasets": {"a": {"samples": 1, "trained_tokens": 5, "loss": 2.5},
                           "b": {"samples": 1, "trained_tokens": 4, "loss": 1.5}}},
             {"step": 2, "eval_loss": 2.2, "eval_tokens": 9,
              "datasets": {"a": {"eval_samples": 1, "eval_trained_tokens": 6, "eval_loss": 2.4},
                           "b": {"eval_samples": 1, "eval_trained_tokens": 3, "eval_loss": 1.8}}}]
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    c = curves(out)
    assert c["datasets"] == {"a": ([1, 2], [3.5, 2.5]), "b": ([2], [1.5])}
    assert c["eval_datasets"] == {"a": ([2], [2.4]), "b": ([2], [1.8])}
    assert c["eval_loss"] == ([2], [2.2])
    _is_png(plot_run(out))


def test_overall_loss_when_log_has_no_datasets(tmp_path):
    out, lines = _log(tmp_path, with_datasets=False)
    c = curves(out)
    assert c["datasets"] == {} and c["eval_datasets"] == {}
    assert c["loss"][1] == _expected(lines, "train", None)[1]
    _is_png(plot_run(out))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "train.plot", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_png_and_missing_log_is_one_line_error(tmp_path):
    out, _ = _log(tmp_path)
    p = _cli(out)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == out / PNG_NAME
    _is_png(out / PNG_NAME)
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _cli(empty)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: ")
    assert "train_log.jsonl: no training log" in p.stderr and "Traceback" not in p.stderr


def test_bad_line_names_file_and_line(tmp_path):
    out, _ = _log(tmp_path)
    text = (out / "train_log.jsonl").read_text().splitlines()
    text.insert(3, "{not json")
    (out / "train_log.jsonl").write_text("\n".join(text) + "\n")
    p = _cli(out)
    assert p.returncode == 1 and "train_log.jsonl:4: not JSON" in p.stderr
    assert "Traceback" not in p.stderr


def test_plot_does_not_import_torch():
    probe = "import sys, train; print('torch' in sys.modules)"
    if subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip() == "True":
        pytest.skip("train/__init__.py itself imports torch (H2's lazy-import request is pending)")
    code = "import sys, train.plot; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.stdout.strip() == "False", p.stderr


def test_a_single_eval_point_is_drawn_and_a_task_keeps_its_colour(tmp_path):
    """One evaluation (the usual short run) is a visible marker, not an invisible one-point line;
    a task has the same colour in the train and eval panels even when it is listed, or first
    trains, in another order there."""
    from matplotlib.colors import to_hex

    from train.plot import figure
    out = tmp_path / "run"
    out.mkdir()
    lines = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3,
              "datasets": {"sft": {"samples": 1, "trained_tokens": 9, "loss": 3.1 - 0.1 * s},
                           **({"pt": {"samples": 1, "trained_tokens": 9, "loss": 2.9}} if s > 1 else {})}}
             for s in (1, 2, 3)]
    lines.append({"step": 3, "eval_loss": 2.5, "eval_tokens": 9,
                  "datasets": {"pt": {"eval_samples": 1, "eval_trained_tokens": 4, "eval_loss": 2.4},
                               "zz": {"eval_samples": 1, "eval_trained_tokens": 2, "eval_loss": 2.0},
                               "sft": {"eval_samples": 1, "eval_trained_tokens": 3, "eval_loss": 2.6}}})
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    fig = figure(out)
    train_ax, eval_ax = fig.axes[0], fig.axes[1]
    colour = {}
    for ax in (train_ax, eval_ax):
        for line in ax.get_lines():
            label = line.get_label()
            if label.startswith("_"):  # the faint raw curve of a labelled one
                continue
            assert colour.setdefault(label, to_hex(line.get_color())) == to_hex(line.get_color()), label
    assert len({colour[n] for n in ("sft", "pt", "zz")}) == 3
    evals = {ln.get_label(): ln for ln in eval_ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(evals) == {"all datasets", "sft", "pt", "zz"}
    for name, ln in evals.items():
        assert len(ln.get_xdata()) == 1 and ln.get_marker() not in ("None", "", None), name
    _is_png(plot_run(out))
