"""Where a study's runs execute: on this machine (the engines' own sessions) or on Slurm
(``slurm``, through submitit)."""
