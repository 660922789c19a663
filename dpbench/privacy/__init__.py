"""Privacy layer: accounting over dp-accounting, the privacy ledger, private selection and
the statistics of empirical audits. Imports only `dpbench.errors` and the bottom helpers."""
