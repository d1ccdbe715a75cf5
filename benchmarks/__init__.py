"""`srpo bench`: our trainer and sampler side by side with the authors' recipe, on one machine.

Run as `python -m benchmarks --suite cpu --size full` (or `srpo bench …`) from the repository
root; README.md in this folder explains every figure.
"""
