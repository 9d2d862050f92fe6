"""pipeline/sampling.sample_records: the records a sample holds are the ones the workers would
build (adapted and transformed), in source order, with what was passed over counted."""
import json

from pipeline.sampling import sample_records
from pipeline.worker import DatasetJob
from stages.readers import plan_units


def _dataset(tmp_path, n_files=2, n=10):
    files = []
    for f in range(n_files):
        path = tmp_path / f"part{f}.jsonl"
        lines = []
        for i in range(n):
            if i % 4 == 3:
                lines.append(json.dumps({"instruction": ""}))  # fails to adapt (no output)
            else:
                lines.append(json.dumps({"instruction": f"q{f}.{i}", "output": f"a{f}.{i}"}))
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    return files


def _job(transform=None):
    return DatasetJob("d", "alpaca", "unused", "chatml", 64, "segment", "assistant", transform, 1234,
                      on_error="skip", work_dir="")


def _questions(sample):
    return [r["messages"][0]["content"] for r in sample.records]


def test_first_records_in_source_order_with_passed_over_counted(tmp_path):
    files = _dataset(tmp_path)
    units = plan_units(files)
    got = sample_records(_job(), units, 5)
    assert _questions(got) == ["q0.0", "q0.1", "q0.2", "q0.4", "q0.5"]
    assert got.where == [(files[0], r) for r in (0, 1, 2, 4, 5)]
    assert got.read == 6 and sum(got.passed.values()) == 1
    raw = (tmp_path / "part0.jsonl").read_bytes().splitlines()[:6]
    assert got.raw_bytes == sum(len(json.dumps(json.loads(x), separators=(",", ":")).encode()) + 1 for x in raw)
    # a scan limit bounds the records read, a char budget the text taken
    assert len(sample_records(_job(), units, 100, scan=3)) == 3
    assert len(sample_records(_job(), units, 100, chars=1)) == 1
    assert len(sample_records(_job(), units, 100)) == 16  # every good record of both files


def test_spread_takes_a_share_of_every_unit(tmp_path):
    files = _dataset(tmp_path)
    units = plan_units(files)
    assert len({u.file for u in units}) == 2
    got = sample_records(_job(), units, 2 * len(units), spread=True)
    assert {f for f, _ in got.where} == set(files)


def test_the_transform_is_applied(tmp_path):
    files = _dataset(tmp_path, n_files=1)
    script = tmp_path / "t.py"
    script.write_text("def transform(data, num_sample, r):\n"
                      "    if data['messages'][0]['content'].endswith('.0'):\n"
                      "        return None\n"
                      "    data['messages'][0]['content'] = data['messages'][0]['content'].upper()\n"
                      "    return data\n")
    got = sample_records(_job(str(script)), plan_units(files), 2)
    assert _questions(got) == ["Q0.1", "Q0.2"]
    assert got.passed["transform_skipped"] == 1
