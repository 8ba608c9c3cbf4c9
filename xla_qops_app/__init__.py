"""The application floor: the `xla-qops` command line, the demo and the benchmarks.

Above both faces (`xla_qops`, `torch_bridge`); nothing below imports it
(docs/architecture.md).
"""
