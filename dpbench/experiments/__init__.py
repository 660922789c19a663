"""Experiments layer: one module per notebook with its arms, sweeps, claim rows and tables,
as plain tested functions; notebooks call them and plot. No module here names a notebook:
notebooks pass paths and names in."""
