"""The project's benchmarks: one module per experiment, run as subcommands of
``python -m benchmarks`` (``python -m benchmarks --help`` lists them). What they share:
``recipes`` (how they train, through the pipeline's builder and stage settings), ``cache``
(the result caches under ``results/``), ``stats`` (intervals, Kendall's tau) and ``common``
(timing on any device). Their extra dependencies are the ``bench`` extra
(``pip install -e .[bench]``); results and tables go to ``results/`` and BENCHMARKS.md.
"""
