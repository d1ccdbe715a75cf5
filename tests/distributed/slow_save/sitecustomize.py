"""On PYTHONPATH via `support.slow_saves` only: in each torchrun worker, rank 0 waits
SRPO_TEST_SAVE_PAUSE_S seconds after writing a checkpoint's train_state.json, before the
checkpoint is published: a save as slow as a large model's, whose window a test can hit."""

import os

if "RANK" in os.environ and "SRPO_TEST_SAVE_PAUSE_S" in os.environ:
    import time
    from pathlib import Path

    import srpo.train.checkpoint as checkpoint

    write = checkpoint.write_json

    def paused(path, data):
        write(path, data)
        if Path(path).name == checkpoint.TRAIN_STATE:
            time.sleep(float(os.environ["SRPO_TEST_SAVE_PAUSE_S"]))

    checkpoint.write_json = paused
