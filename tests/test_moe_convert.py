"""train.convert_ckpt_to_outer / train.check_converted on tiny MoE models saved per-expert by
transformers itself, experts split across shards. The oracle is transformers' own fused layout
(`save_pretrained(save_original_format=False)`) and the logits of the original model."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train.convert_ckpt_to_outer as conv
from train.check_converted import main as check_main
from train.moe_layout import ANY_EXPERT_RE

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8)
CASES = {
    "qwen3_moe": dict(num_hidden_layers=2, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "hy_v3": dict(num_hidden_layers=3, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                  num_shared_experts=1),
}
WORKERS = {"qwen3_moe": 2, "mixtral": 1, "hy_v3": 1}  # one case through the process pool
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def tiny(model_type):
    if model_type == "hy_v3" and not hasattr(transformers, "HYV3ForCausalLM"):
        pytest.skip("this transformers has no hy_v3")
    cfg = AutoConfig.for_model(model_type, **{**BASE, **CASES[model_type]})
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere (default init zeroes some)
        for _, p in m.named_parameters():
            p.normal_(0, .2) if p.dim() > 1 else p.normal_(1, .05)
        for n, b in m.named_buffers():
            if "e_score_correction_bias" in n:
                b.normal_(0, .1)
    return m


def add_mtp_layer(d: Path, n_layers: int):
    """A Hy3-style MTP layer (model.layers.N: a MoE layer + eh_proj/enorm/hnorm/final_layernorm),
    per-expert, in a shard of its own, as the hub checkpoint has it."""
    index = json.loads((d / conv.INDEX).read_text())
    src, dst = f"model.layers.{n_layers - 1}.", f"model.layers.{n_layers}."
    mtp = {}
    for key, f in index["weight_map"].items():
        if key.startswith(src):
            with safe_open(str(d / f), "pt") as h:
                mtp[dst + key[len(src):]] = h.get_tensor(key).clone()
    H = BASE["hidden_size"]
    g = torch.Generator().manual_seed(5)
    for k in ("enorm", "hnorm", "final_layernorm"):
        mtp[f"{dst}{k}.weight"] = torch.rand(H, generator=g)
    mtp[f"{dst}eh_proj.weight"] = torch.rand(H, 2 * H, generator=g)
    save_file(mtp, str(d / "model-mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    (d / conv.INDEX).write_text(json.dumps(index))
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    return set(mtp)


def all_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


_BUILT: dict = {}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


def built(mt, tmp_path_factory):
    """Per-expert save (IN), transformers' fused save (ORACLE), our conversion (OUT); once per type."""
    if mt not in _BUILT:
        _BUILT[mt] = _build(mt, tmp_path_factory.mktemp(mt))
    return _BUILT[mt]


def _build(mt, root):
    m = tiny(mt)
    with torch.no_grad():
        ref = m(IDS).logits
    m.save_pretrained(root / "in", max_shard_size="3KB")  # default: per-expert (hub) keys
    m.save_pretrained(root / "oracle", save_original_format=False)  # transformers' fused layout
    (root / "in" / "tokenizer_config.json").write_text("{}")  # stands for the tokenizer files
    mtp = add_mtp_layer(root / "in", m.config.num_hidden_layers) if mt == "hy_v3" else set()
    index = json.loads((root / "in" / conv.INDEX).read_text())
    spans = {}
    for k, f in index["weight_map"].items():
        if ANY_EXPERT_RE.search(k):
            spans.setdefault(k.split(".experts.")[0], set()).add(f)
    assert any(len(s) > 1 for s in spans.values()), "the fixture must split an expert group across shards"
    assert conv.main(["--input_dir", str(root / "in"), "--output_dir", str(root / "out"),
                      "--workers", str(WORKERS[mt])]) == 0
    return dict(mt=mt, root=root, ref=ref, mtp=mtp)


def test_converted_tensors_equal_transformers_fused_layout(case):
    out, oracle = all_tensors(case["root"] / "out"), load_file(str(case["root"] / "oracle" / "model.safetensors"))
    non_mtp = {k: v for k, v in out.items() if not k.startswith(f"model.layers.{CASES[case['mt']]['num_hidden_layers']}.")}
    assert set(non_mtp) == set(oracle)
    for k, t in oracle.items():
        assert non_mtp[k].dtype == t.dtype and torch.equal(non_mtp[k], t), k
    assert not [k for k in out if ANY_EXPERT_RE.search(k)]
    if case["mt"] == "hy_v3":  # the MTP layer is fused too
        n = CASES["hy_v3"]["num_hidden_layers"]
        assert out[f"model.layers.{n}.mlp.experts.gate_up_proj"].shape == (6, 32, 32)
        assert torch.equal(out[f"model.layers.{n}.mlp.experts.down_proj"],
                           out[f"model.layers.{n - 1}.mlp.experts.down_proj"])


def test_index_matches_disk_and_other_files_copied(case):
    out = case["root"] / "out"
    index = json.loads((out / conv.INDEX).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in out.glob("*.safetensors")}
    assert all(f.stat().st_size > conv_empty() for f in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in all_tensors(out).values())
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text()) == json.loads((case["root"] / "in" / "config.json").read_text())


def conv_empty():
    return 40  # a safetensors file with no tensor and {"format": "pt"} metadata


def test_converted_loads_with_no_missing_key_and_same_logits(case):
    m, info = AutoModelForCausalLM.from_pretrained(case["root"] / "out", dtype=torch.float32,
                                                   output_loading_info=True)
    assert info["missing_keys"] == set() and not info["mismatched_keys"]
    n = m.config.num_hidden_layers  # transformers drops the MTP layer on load (Hy3's layer 80)
    assert all(k.startswith(f"model.layers.{n}.") for k in info["unexpected_keys"])
    assert len(info["unexpected_keys"]) == (len(case["mtp"]) - 6 * 3 + 2 if case["mtp"] else 0)  # 6 experts x 3 -> 2
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(IDS).logits, case["ref"], atol=1e-5, rtol=1e-5)
    per_expert = AutoModelForCausalLM.from_pretrained(case["root"] / "in", dtype=torch.float32)
    a, b = m.state_dict(), per_expert.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_on_fused_checkpoint_is_a_copy(case, tmp_path):
    assert conv.main(["--input_dir", str(case["root"] / "out"), "--output_dir", str(tmp_path / "again"),
                      "--workers", "1"]) == 0
    a, b = all_tensors(case["root"] / "out"), all_tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checker_passes_converted_and_fails_unconverted(case, capsys):
    assert check_main([str(case["root"] / "out"), "--spot-check", "3"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert check_main([str(case["root"] / "in")]) == 1
    assert "per-expert key" in capsys.readouterr().out


# ------------------------------------------------------------------ faults (Hy3 only: all features)
@pytest.fixture
def hy3(tmp_path_factory, tmp_path):
    case = built("hy_v3", tmp_path_factory)
    shutil.copytree(case["root"] / "out", tmp_path / "out")
    return case, tmp_path / "out"


def _rewrite(d: Path, key: str, fn):
    index = json.loads((d / conv.INDEX).read_text())
    f = d / index["weight_map"][key]
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return index, f


def _check_fails(d, capsys, needle):
    assert check_main([str(d), "--spot-check", "99"]) == 1
    text = capsys.readouterr().out
    assert needle in text and "FAIL" in text, text


def test_checker_fails_missing_expert(hy3, capsys):
    _, d = hy3
    key = "model.layers.1.mlp.experts.gate_up_proj"
    _rewrite(d, key, lambda t: t.update({key: t[key][:-1].clone()}))
    _check_fails(d, capsys, "has shape [5, 32, 32]")


def test_checker_fails_empty_shard(hy3, capsys):
    _, d = hy3
    index = json.loads((d / conv.INDEX).read_text())
    (d / index["weight_map"]["model.norm.weight"]).write_bytes(b"")
    _check_fails(d, capsys, "empty file")


def test_checker_fails_nan(hy3, capsys):
    _, d = hy3
    key = "model.layers.2.mlp.experts.down_proj"
    _rewrite(d, key, lambda t: t[key].view(-1).__setitem__(7, float("nan")))
    _check_fails(d, capsys, "NaN or Inf")


def test_checker_fails_leftover_per_expert_key(hy3, capsys):
    _, d = hy3
    key, extra = "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.0.down_proj.weight"
    index, f = _rewrite(d, key, lambda t: t.update({extra: t[key][0].clone()}))
    index["weight_map"][extra] = f.name
    (d / conv.INDEX).write_text(json.dumps(index))
    _check_fails(d, capsys, "per-expert key")


def test_checker_fails_missing_mtp_key_and_orphans(hy3, capsys):
    _, d = hy3
    (d / "model-99998-of-99999.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")  # empty residue
    assert check_main([str(d)]) == 0
    assert "empty residue" in capsys.readouterr().out
    save_file({"x": torch.ones(3)}, str(d / "model-99999-of-99999.safetensors"))
    _check_fails(d, capsys, "the index does not name")
    (d / "model-99999-of-99999.safetensors").unlink()
    key = "model.layers.3.eh_proj.weight"
    index, _ = _rewrite(d, key, lambda t: t.pop(key))
    del index["weight_map"][key]
    (d / conv.INDEX).write_text(json.dumps(index))
    _check_fails(d, capsys, f"missing {key}")


def test_converter_refuses_missing_expert_before_writing(hy3, tmp_path, capsys):
    case, _ = hy3
    src = tmp_path / "in"
    shutil.copytree(case["root"] / "in", src)
    key = "model.layers.2.mlp.experts.4.up_proj.weight"
    index = json.loads((src / conv.INDEX).read_text())
    f = src / index["weight_map"].pop(key)
    t = load_file(str(f))
    del t[key]
    save_file(t, str(f), metadata={"format": "pt"})
    (src / conv.INDEX).write_text(json.dumps(index))
    assert conv.main(["--input_dir", str(src), "--output_dir", str(tmp_path / "o"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: missing expert 4 up_proj of model.layers.2.mlp.experts.") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_wrong_gate_up_order_is_caught_only_by_logits(hy3, tmp_path, monkeypatch):
    """A converter that writes [up, gate] loads silently (no missing or mismatched key, the
    checker passes); the logits comparison above is what catches it."""
    case, _ = hy3
    right = conv.fuse
    monkeypatch.setattr(conv, "fuse", lambda g, u, d: right(u, g, d))
    conv.convert(str(case["root"] / "in"), str(tmp_path / "bad"), workers=1, log=lambda *_: None)
    assert check_main([str(tmp_path / "bad")]) == 0
    m, info = AutoModelForCausalLM.from_pretrained(tmp_path / "bad", dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and not info["mismatched_keys"]
    with torch.no_grad():
        delta = (m.eval()(IDS).logits - case["ref"]).abs().max().item()
    assert delta > 1e-2


def test_abbreviated_flags_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        conv.main(["--input", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "unknown flag --input (did you mean --input_dir?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        check_main([str(tmp_path), "--spot", "1"])
    assert e.value.code == 2 and "(did you mean --spot-check" in capsys.readouterr().err


def test_checker_fails_transposed_down_proj(hy3, capsys):
    _, d = hy3
    key = "model.layers.2.mlp.experts.down_proj"
    _rewrite(d, key, lambda t: t.update({key: t[key].transpose(1, 2).contiguous()}))
    _check_fails(d, capsys, f"{key} has shape [6, 16, 32], the model's is [6, 32, 16]")
