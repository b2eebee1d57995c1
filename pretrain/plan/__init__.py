"""Sizing a run before submitting it: `python -m pretrain.plan <training overrides> plan.world_size=N
plan.device=h100-80gb` runs one real training step of the real Trainer for the requested layout in
this one CPU process, under fake tensors (torch's FakeTensorMode: shapes and dtypes, no data) and a
fake process group of world size N, and reports the memory of the simulated rank(s), whether it fits
the device, and the step time and tokens/s its FLOPs give at a stated utilisation."""
