"""Pulling models from Hugging Face into the store (huggingface_hub + verified streaming).

Public API::

    Puller(store=None, registry=None, *, endpoint=None, token=None, progress=None).plan(name)
    Puller(...).pull(name_or_plan) -> ModelRecord
    ensure_model(name, *, store=None, progress=None, pull=True) -> ModelRecord
"""

from mmchat.hub.download import Downloader, DownloadInterrupted, RemoteFile
from mmchat.hub.progress import PullProgress, RichPullProgress
from mmchat.hub.pull import PlannedFile, Puller, PullPlan, ensure_model

__all__ = [
    "DownloadInterrupted",
    "Downloader",
    "PlannedFile",
    "PullPlan",
    "PullProgress",
    "Puller",
    "RemoteFile",
    "RichPullProgress",
    "ensure_model",
]
