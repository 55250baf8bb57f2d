"""Output is tars's own lines and progress bars, from the command line and from Python alike.

Two libraries speak up on their own: DeepSpeed, which accelerate imports on every `save_pretrained`
whenever it is installed, warns "Setting accelerator to CPU" on a machine without a GPU unless told
its accelerator (`DS_ACCELERATOR`, set by `import tars` on such a machine: the same choice DeepSpeed
makes, without the warning); and transformers draws a bar per weight load ("Loading weights") and
save ("Writing model shards"), which `hf_progress_off` turns off around tars's own loads and
conversions. The `tars` command also turns them off for the whole process (`cli._quiet_libraries`).
A user's own `DS_ACCELERATOR` and `HF_HUB_DISABLE_PROGRESS_BARS` win.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

#: Present on a machine with an NVIDIA (nvidiactl) or ROCm (kfd) driver.
GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd")


def default_ds_accelerator() -> None:
    """`DS_ACCELERATOR=cpu` where no GPU driver is present (unless already set)."""
    if not any(os.path.exists(d) for d in GPU_DEVICES):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextmanager
def hf_progress_off() -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off inside, each restored as it was after
    (left alone where the user asked for them: `HF_HUB_DISABLE_PROGRESS_BARS=0`)."""
    from huggingface_hub import constants
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    if constants.HF_HUB_DISABLE_PROGRESS_BARS is False:
        yield
        return
    tf_on, hub_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # both libraries' bars
    try:
        yield
    finally:
        if tf_on:
            hf_logging.enable_progress_bar()  # both again
        if hub_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()
