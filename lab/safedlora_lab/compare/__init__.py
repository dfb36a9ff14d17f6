"""``safedlora compare``: every method side by side on the same seeds, partitions, rounds and evaluation.

One invocation plans a set of runs (split x method x seed [x learning rate]), runs each one through
the real ``flwr run`` CLI on a private local SuperLink (:class:`~safedlora_app.tools.simulation.LocalFlower`,
Flower's own simulation: no second implementation of anything), and aggregates what the app wrote
(``metrics.jsonl``, ``summary.json``) into tables, plots and ``comparison.json``::

    safedlora compare [--quick] [--name NAME] [--out DIR] [--seeds N] [--methods m1,m2]
                      [--splits natural,dirichlet] [--ablation-seeds N] [--ablation-splits S,...]
                      [--headline-splits S,...] [--rounds T] [--lr-search]
                      [--target-accuracy A] [--set KEY=VALUE ...] [--dry-run]

Layout of ``<out>/<name>/``::

    runs/<split>/<method>-s<seed>/       the app's run directories (config, metrics.jsonl, summary.json, ...)
    runs/<split>/<method>-lrx<m>-s<seed>/  runs at another learning-rate multiplier (``--lr-search``)
    logs/<split>/<run>.log               the ``flwr run --stream`` output of each run
    aborted/                             half-finished run directories moved aside on resume
    plots/<split>/*.png                  accuracy vs round / vs cumulative MB, budget, sa-fedlora's ranks
    table.csv, table.md                  one row per split + method
    comparison.json                      everything: commands, settings, chosen lrs, machine, rows

Resuming: a run whose ``summary.json`` exists is skipped (after checking that it was made with the
same settings); a run directory without one (a run that was interrupted) is moved to ``aborted/``
and the run is done again.

The package is pure functions plus a thin runner: :mod:`.plan` (methods, splits, presets, the resolved options,
run planning; pure), :mod:`.tables` (aggregation, tables and plots of finished runs), :mod:`.runner` (``flwr run``
per planned run, resuming) and :mod:`.cli` (the command line, :func:`main`). ``--help`` and ``--dry-run`` import
:mod:`.plan` alone.
"""

from .cli import main

__all__ = ["main"]
