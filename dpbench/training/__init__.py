"""Training layer: Poisson sampling, the DP optimizer, the one training loop with its step
plans and hooks (public/private mixing, adaptive clipping), distributed and pipeline DP,
last-layer solvers over features, the bench harness and canary runs for audits."""
