"""Workbench layer: the reproducibility machinery. Parameters and profiles, notebook
execution (papermill, cache, atomic swap), scheduling, provenance, tidy results and figures,
verdicts, the report, compare and the `dpbench` command line."""
