"""Helpers of `xla-qops bench` (xla_qops_app/commands/bench.py): the peers each case
is timed against (`peers`) and the markdown table and plot (`report`)."""
