"""Spoken multiple-choice data: the record schema, readers and writers, tasks, speech and audio."""
