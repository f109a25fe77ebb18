"""Test fixtures for the launch scripts: a local SLURM cluster and readers for training runs."""
