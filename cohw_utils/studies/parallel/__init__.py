"""Chapter 4.7's parallelism study: per-rank predictions of sharded models
(:mod:`cohw_utils.spine.shard`, :mod:`cohw_utils.views.parallel`) set beside a real two-process
gloo run on this machine (:mod:`.gloo_run`) and beside published multi-GPU measurements."""
