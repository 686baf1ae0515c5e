"""Subprocess side of the fine-tuning kill tests (tests/test_finetune.py).

    python tests/_finetune_worker.py DATA.npz CHECKPOINT_DIR PARAMS_JSON MODE

MODE ``slow-epochs``: the first batch after the first epoch hangs, so the parent can SIGKILL the
process mid-epoch once the first checkpoint exists (and the run can never finish first).
MODE ``hang-in-save``: the second checkpoint write stops halfway (after writing some bytes to
the temp file) and hangs, so the parent can SIGKILL the process in the middle of a checkpoint
write.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    data_path, ckpt_dir, params_json, mode = sys.argv[1:5]
    data = np.load(data_path)
    params = json.loads(params_json)

    import torch

    from featurepipe.finetune import Callback, FineTuneClassifier

    class SlowEpochs(Callback):
        def on_batch_end(self, trainer, batch):  # noqa: ANN001 - test helper
            if trainer.epoch >= 1:
                time.sleep(3600)  # until killed

    callbacks = []
    if mode == "slow-epochs":
        callbacks.append(SlowEpochs())
    elif mode == "hang-in-save":
        real_save = torch.save
        calls = {"n": 0}

        def hanging_save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202 - test helper
            calls["n"] += 1
            if calls["n"] < 2:
                return real_save(obj, f, *args, **kwargs)
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            Path(ckpt_dir, "WRITING").write_text("1")
            time.sleep(3600)  # until killed
            raise SystemExit(3)

        torch.save = hanging_save
    else:
        raise SystemExit(f"unknown mode {mode}")
    clf = FineTuneClassifier(checkpoint_dir=ckpt_dir, callbacks=callbacks, **params)
    clf.fit(data["X"], data["y"])
    Path(ckpt_dir, "FINISHED").write_text("1")


if __name__ == "__main__":
    main()
