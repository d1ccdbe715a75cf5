"""The shared runtime every stage stands on: process group and device, seeds, dtypes, kernels.

Encoding, training, sampling and scoring all run under the same `DistributedContext` and draw
from the same counter-based seeds, so none of them imports another stage to get them.
"""
