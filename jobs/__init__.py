"""Cluster jobs: the Slurm pipeline (jobs.pipeline) and its status (jobs.status)."""
