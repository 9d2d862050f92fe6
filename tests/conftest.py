import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = ROOT / "sample_data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sample_tokenizer() -> str:
    path = SAMPLE / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        pytest.fail("sample_data/tokenizer is missing: run python sample_data/make_tokenizer.py")
    return str(path)
