"""Studies: grids of runs, searches, studies in stages, running a study and its progress."""
