"""Building third-party models without ever reaching the network.

pyiqa, its CLIP loader, torch hub and timm fetch weights whenever a file is missing.
Inside ``refuse_downloads`` every such fetch raises ``MetricUnavailable`` naming the
file and where it belongs, so a metric is either built from local files or reported
unavailable with that reason. The hooks are swapped in for the duration of the build
only, on the calling thread's watch (metrics build once per worker).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import Any

from antipers.metrics.base import MetricUnavailable


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def refuse_downloads(what: str) -> Iterator[None]:
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.errors as hf_errors
    import pyiqa.archs.clip_model as pyiqa_clip
    import pyiqa.utils.download_util as pyiqa_download
    import torch.hub

    def refuse(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise MetricUnavailable(
            f"{what}: weights file {dst} is not there (published at {url}); place it there, "
            "antipers never downloads"
        )

    def clip_from_disk(url: str, root: str) -> str:
        target = os.path.join(root, os.path.basename(url))
        if not os.path.isfile(target):
            refuse(url, target)
        expected = url.split("/")[-2]
        with open(target, "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != expected:
                raise MetricUnavailable(f"{what}: {target} does not match its SHA-256 {expected}")
        return target

    with contextlib.ExitStack() as stack:
        stack.enter_context(_swapped(pyiqa_download, "download_url_to_file", refuse))
        stack.enter_context(_swapped(torch.hub, "download_url_to_file", refuse))
        stack.enter_context(_swapped(pyiqa_clip, "_download", clip_from_disk))
        stack.enter_context(_swapped(hf_constants, "HF_HUB_OFFLINE", True))
        try:
            yield
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
            raise MetricUnavailable(f"{what}: a Hugging Face file is not cached ({exc})") from None
