"""Ray on a real cluster shape (issue 13): a head node and a second node, each a separate raylet
with its own resources, started on this machine with ray.cluster_utils.Cluster; the build's
units run as Ray tasks across both, and the built dirs are byte-identical to the local
executor's (joined shards included)."""
import hashlib
import json

import orjson
import pytest

pytestmark = pytest.mark.slow


def digests(cache):
    out = {}
    for d in sorted(p for p in cache.iterdir() if p.is_dir() and (p / "meta.json").exists()):
        for f in sorted(d.iterdir()):
            if f.suffix in (".h5", ".json", ".jsonl"):
                out[f"{d.name}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_two_node_cluster_build_equals_local(tmp_path, sample_tokenizer):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from pipeline.build import build_mixture
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):  # six files → six units → tasks spread over both nodes
        (src / f"part-{k}.jsonl").write_bytes(b"".join(
            orjson.dumps({"text": f"part {k} doc {i} " + "lorem ipsum " * (i % 40)}) + b"\n"
            for i in range(200)))
    (tmp_path / "mix.json").write_text(json.dumps({
        "tokenizer": sample_tokenizer, "template": "chatml", "max_length": 256, "seed": 1,
        "datasets": [{"dataset_name": "parts", "task_name": "pt", "abs_weight": 1.0, "path": "src"}]}))
    mix = str(tmp_path / "mix.json")
    _, local, _ = build_mixture(mix, cache=str(tmp_path / "local"), out=str(tmp_path / "o1"), workers=2)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"second_node": 1})
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        _, on_ray, _ = build_mixture(mix, cache=str(tmp_path / "ray"), out=str(tmp_path / "o2"),
                                     executor="ray", ray_address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    # the units really ran on both nodes (each has 1 CPU, 6 units: neither can take them all)
    assert len(on_ray[0].ray_nodes) == 2 and sum(on_ray[0].ray_nodes.values()) == 6, on_ray[0].ray_nodes
    assert len(on_ray[0].meta["shards"]) == len(local[0].meta["shards"]) == 1  # six files, one shard
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
    assert on_ray[0].entry.final.name == local[0].entry.final.name
