"""Operating a long run on a shared cluster: signals and time limits (leave with a checkpoint and
ask to be requeued), the non-finite guard, the hang watchdog, the run-directory lock, and the exit
codes a batch script reads. Each file is one idea; the training loop calls them at step boundaries
(see pretrain/operations/session.py for the few calls the loop makes)."""
