"""srpo-workflow: Direct-Align + Semantic Relative Preference Optimization for FLUX."""

from importlib import metadata

try:
    __version__ = metadata.version("srpo-workflow")
except metadata.PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
