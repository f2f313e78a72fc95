"""NViT: Hessian-aware, latency-regularized global structural pruning (issue 6, in progress)."""
