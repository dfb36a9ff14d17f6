"""Helpers the test modules share: in-process runs (runs), a strategy with hand-made replies (strategy),
real SuperLink/SuperNode processes on loopback (deployment). No test module imports another."""
