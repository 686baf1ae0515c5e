"""Run `featurepipe embed` in a subprocess for kill/concurrency tests.

argv: ROOT STORE SLOW_SECONDS_PER_BATCH [extra CLI args]. The sleep is patched into the forward pass
so the test can SIGKILL the process mid-run deterministically.
"""

from __future__ import annotations

import sys
import time

import featurepipe.embedding.forward as engine
from featurepipe.cli import main

root, store, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
if slow:
    real_forward = engine.start_forward

    def slow_forward(*args, **kwargs):
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
