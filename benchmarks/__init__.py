"""Our trainer and sampler side by side with the authors' recipe, on one machine.

Run as `python -m benchmarks --suite cpu --size full` from the repository root (the folder is
not installed with srpo); README.md in this folder explains every figure.
"""
