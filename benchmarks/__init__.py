"""Speed benchmarks, one script per benchmark, run from the repository root as modules:

    PYTHONPATH=src python -m benchmarks.train_throughput --smoke

Shared pieces: ``machine`` (device facts, threads, forked cases), ``step`` (a training step of a case),
``flops`` (model FLOPs), ``tables`` (console and markdown tables, RESULTS.md blocks), ``args`` (common
command-line arguments). Results go into benchmarks/RESULTS.md.
"""
