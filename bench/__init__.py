"""Benchmarks and experiments of mindskip_ext, run from the repository root as modules:

    python -m bench.run --quick                  # micro, layer and e2e sections (bench/results/<device>.md)
    python -m bench.plot bench/results/<device>.jsonl
    python -m bench.replicate --smoke            # Router-Tuning's Table 1 and Figure 2 at small scale
    python -m bench.training_compare --model tiny

Shared plumbing (row schema, results files, machine info, markdown tables) is in :mod:`bench.common`;
the one figure helper is :func:`bench.plot.figure`.
"""
