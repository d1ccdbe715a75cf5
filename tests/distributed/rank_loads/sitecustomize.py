"""On PYTHONPATH in test_only_rank_0_reads_the_base_weights only: each torchrun worker appends
its rank to SRPO_TEST_LOADS whenever the trainer reads the whole base transformer."""

import os

if "RANK" in os.environ and "SRPO_TEST_LOADS" in os.environ:
    import srpo.train.step as step

    read = step.load_transformer

    def recorded(*args, **kwargs):
        with open(os.environ["SRPO_TEST_LOADS"], "a") as handle:
            handle.write(f"{os.environ['RANK']}\n")
        return read(*args, **kwargs)

    step.load_transformer = recorded
