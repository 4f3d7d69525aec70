"""runtime: run one model under every runtime, compare with PyTorch, localise, report."""
