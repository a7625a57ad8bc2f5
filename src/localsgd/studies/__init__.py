"""Studies: run configs, the training loop, sweeps over grids, and the results store."""
