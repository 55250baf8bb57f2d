"""tars: measure and close the modality reasoning gap of Speech LLMs."""

from tars.quiet import default_ds_accelerator

__version__ = "0.1.0"

default_ds_accelerator()  # no DeepSpeed "Setting accelerator to CPU" warning on a GPU-less machine (tars.quiet)
