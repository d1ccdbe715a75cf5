"""`python -m benchmarks`, from the repository root: the benchmarks' one entry point."""

from benchmarks.run import app

app(prog_name="python -m benchmarks")
