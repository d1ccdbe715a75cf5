from benchmarks.run import app

app()
