"""Offline work on a Ray cluster: batch generation (`specmoe batch`) and job submission (`specmoe submit`)."""

from specmoe_ray.jobs.batch import BatchSummary, Defaults, run_batch

__all__ = ["BatchSummary", "Defaults", "run_batch"]
