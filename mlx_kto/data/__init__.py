"""Feedback data: rows from files, folders, tables and the hub, validated into `Example`s,
tokenized as TRL does, paired for DPO, batched into micro-batches."""
