"""Tensor parallelism as verified graph rewrites.

* :mod:`~graphopt.ops.parallel` -- the parallel ops of the registry (shard and the collectives);
* :mod:`.rules` -- the sharding rules (``substitutions/parallel.rules``), verified over all ranks;
* :mod:`.layouts` -- replicated, split and partial tensors;
* :mod:`.search` -- the plan search over a torch.export graph, every layout checked;
* :mod:`.lower` -- one rank's program, and the simulation of all ranks in one process;
* :mod:`.collectives` -- what a rank runs: torch.distributed functional collectives;
* :mod:`.comm` -- what communication costs (device table, or measured on the group);
* :mod:`.plan` -- :func:`parallelize` and :func:`plan_parallel`, the report;
* :mod:`.launch` -- N local CPU processes on gloo (``graphopt optimize --tp N``).
"""
