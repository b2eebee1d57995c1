"""Checkpoints: one Checkpointer (checkpointer.py) owns when and how they are written and read.

    layout.py      names, places, the one listing (list_checkpoints)
    store.py       what a checkpoint holds; load_checkpoint / load_model_weights
    checksums.py   checksums.json
    integrity.py   can this checkpoint be trusted (checkpoint_problem), damage marks, `trust`
    loader.py      which checkpoint to read, with fallback (load_sound)
    inference.py   which checkpoint a path names (resolve_checkpoint), its model shape and tokenizer
    writer.py      writing, synchronous or in the background; save_checkpoint
    lock.py        one trainer per checkpoint directory
    storage.py     the checkpoint directory: checkpoint.dir link, lock, owner, new-run check
    errors.py      what can go wrong, each with its exit code
    policy.py      when to save (SavePolicy)
    checkpointer.py  the Checkpointer the training loop holds
    __main__.py    python -m pretrain.checkpoint check|trust
"""
