"""Tensor parallelism as verified graph rewrites (see :func:`graphopt.parallel.plan.parallelize`)."""
