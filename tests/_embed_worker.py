"""Run `featurepipe embed` in a subprocess for kill/concurrency tests.

argv: ROOT STORE SLOW_SECONDS_PER_BATCH [extra CLI args]. The sleep is patched into the forward
pass. With ``FP_TEST_HOLD=PATH`` in the environment, each forward pass begun once
``FP_TEST_HOLD_AFTER_SHARDS`` (default 0) shards are on disk first creates ``PATH.waiting`` and
then waits until ``PATH`` exists: the test decides when the run goes on (or kills it there), so
no assertion depends on how fast either process runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import featurepipe.embedding.forward as engine
from featurepipe.cli import main

root, store, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
hold = os.environ.get("FP_TEST_HOLD")
hold_after = int(os.environ.get("FP_TEST_HOLD_AFTER_SHARDS", "0"))
parts = Path(store + ".parts")
if slow or hold:
    real_forward = engine.start_forward

    def slow_forward(*args, **kwargs):
        if hold and len(list(parts.rglob("*.npz"))) >= hold_after:
            Path(hold + ".waiting").touch()
            while not os.path.exists(hold):
                time.sleep(0.02)
        time.sleep(slow)
        return real_forward(*args, **kwargs)

    engine.start_forward = slow_forward

sys.exit(
    main(
        [
            "embed",
            root,
            "--out",
            store,
            "--backbone",
            "timm:test_efficientnet",
            "--weights",
            "random",
            "--image-size",
            "32",
            "--precision",
            "fp32",
            "--dtype",
            "float32",
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--shard-size",
            "8",
            *sys.argv[4:],
        ]
    )
)
