"""`tars plan`: the memory of one training step on one card, from a memory model whose coefficients
are measured (`calibrate.py`, stored in `calibration.json`), for models counted without their weights
(`architecture.py`, `published_configs.json`). The model itself: `memory.py`."""
