"""The stream opens what the pipeline builds, segmented samples included."""
from conftest import SAMPLE

from pipeline.build import build_mixture
from train.stream import MixtureStream


def test_stream_reads_a_segmented_build(tmp_path, sample_tokenizer):
    lock, plans, _ = build_mixture(str(SAMPLE / "mixture.json"), out=str(tmp_path), workers=1, max_length=256)
    assert any(p.meta["n_samples"] > p.meta["nlines"] for p in plans)  # segment split records
    stream = MixtureStream(str(lock), 256, mode="packed", batch_size=2, verify="full")
    batches = [b for _, b in zip(range(5), stream.loader(num_workers=0))]
    assert all(b["input_ids"].shape == (2, 256) for b in batches)
    assert all(int((b["labels"] != -100).sum()) == b["n_trained"] for b in batches)
