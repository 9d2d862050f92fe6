"""Issue 25: launching like the seeds — HOST_GPU_NUM with IP_LIST (Hy3) or NODE_IP_LIST (Hunyuan)
becomes a DeepSpeed hostfile and a `deepspeed --hostfile` command; --dry-run prints both."""
import os
import subprocess
import sys

import pytest

from test_train_helpers import ROOT

from train.launch import LaunchError, hosts_from_env

TRAIN = ["--mixture", "L", "--model_config", "C", "--output_dir", "O", "--max_steps", "2"]


def dry_run(env, args=TRAIN, own=()):
    full = {k: v for k, v in os.environ.items() if k not in ("IP_LIST", "NODE_IP_LIST", "HOST_GPU_NUM", "LOCAL_IP")}
    return subprocess.run([sys.executable, "-m", "train.launch", "--dry-run", "--master_port", "12345", *own, *args],
                          cwd=ROOT, env={**full, **env}, capture_output=True, text=True, timeout=120)


def test_hy3_ip_list(tmp_path):
    hf = tmp_path / "hf"
    p = dry_run({"HOST_GPU_NUM": "8", "IP_LIST": "10.0.0.1,10.0.0.2"}, own=("--hostfile", str(hf)))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "10.0.0.1 slots=8" in lines and "10.0.0.2 slots=8" in lines
    cmd = lines[-1].split()
    assert cmd[1:8] == ["--hostfile", str(hf), "--master_addr", "10.0.0.1", "--master_port", "12345", "--module"]
    assert cmd[8] == "train" and cmd[9:] == TRAIN
    assert not hf.exists()  # a dry run writes nothing


def test_hunyuan_node_ip_list_and_local_ip():
    hosts, master = hosts_from_env({"HOST_GPU_NUM": "8", "NODE_IP_LIST": "1.1.1.1:8,2.2.2.2:4",
                                    "LOCAL_IP": "2.2.2.2"})
    assert hosts == [("1.1.1.1", 8), ("2.2.2.2", 4)] and master == "2.2.2.2"


@pytest.mark.parametrize("env,match", [
    ({"IP_LIST": "1.1.1.1"}, "HOST_GPU_NUM is not set"),
    ({"HOST_GPU_NUM": "8"}, "IP_LIST"),
    ({"HOST_GPU_NUM": "x", "IP_LIST": "1.1.1.1"}, "GPU count"),
    ({"HOST_GPU_NUM": "8", "IP_LIST": "1.1.1.1,1.1.1.1"}, "listed twice"),
    ({"HOST_GPU_NUM": "8", "IP_LIST": "1.1.1.1", "NODE_IP_LIST": "2.2.2.2:8"}, "different nodes"),
    ({"HOST_GPU_NUM": "8", "IP_LIST": "1.1.1.1", "LOCAL_IP": "3.3.3.3"}, "LOCAL_IP"),
])
def test_bad_environment_is_one_line(env, match):
    with pytest.raises(LaunchError, match=match):
        hosts_from_env(env)


def test_bad_training_flags_fail_before_launch():
    p = dry_run({"HOST_GPU_NUM": "1", "IP_LIST": "127.0.0.1"}, TRAIN + ["--lr", "1"])
    assert p.returncode == 2 and "unknown flag --lr" in p.stderr
