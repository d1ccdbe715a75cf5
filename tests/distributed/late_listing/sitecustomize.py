"""On PYTHONPATH in test_resume_is_decided_by_rank_0 only: every rank but 0 lists no complete
checkpoint, as a shared file system can show another node's rename late."""

import os

if os.environ.get("RANK", "0") != "0":
    from srpo.train.checkpoint import Checkpointer

    Checkpointer.latest = lambda self: None
