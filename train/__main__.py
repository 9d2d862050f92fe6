"""`python -m train` (also under `deepspeed --module train` and `torchrun -m train`)."""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local dirs only; never reach for the Hub
    from train.args import TrainError, UsageError, parse_args
    args = parse_args(argv)  # bad usage exits 2 here
    from train.trainer import finish, run
    try:
        run(args)
    except (TrainError, UsageError) as e:
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
