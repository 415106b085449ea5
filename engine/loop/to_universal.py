"""DeepSpeed's ``ds_to_universal`` with every ``torch.load`` made safe (engine.serialization).

    python -m engine.loop.to_universal --input_folder CKPT --output_folder OUT [DeepSpeed's flags]

The converter unpickles every checkpoint file with ``weights_only=False``; here it runs with the
load guard in place, and its worker processes are forked so they inherit it.
"""

from __future__ import annotations

import multiprocessing
import sys

from engine.serialization import load_guard


def main(argv: list[str] | None = None) -> int:
    multiprocessing.set_start_method("fork", force=True)  # workers inherit the guard
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    with load_guard():
        ds_to_universal.main(ds_to_universal.parse_arguments())
    return 0


if __name__ == "__main__":
    sys.exit(main())
