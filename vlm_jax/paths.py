"""Local paths for run folders: a URL (gs://, s3://, ...) is refused with a clear error instead of
becoming a local folder named "gs:" by os.path.abspath."""

from __future__ import annotations

import os
import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_dir(path: str, what: str = "workdir") -> str:
    """The absolute local path of `path` (~ expanded); ValueError for a URL.

    Workdirs are written with local file APIs (metrics.jsonl is appended to, TensorBoard and the
    samples are plain files). On pods, point them at a shared mount of the bucket (gcsfuse, NFS)."""
    path = os.fspath(path)
    if _URL.match(path):
        raise ValueError(
            f"{what} {path!r} is a URL: vlm-jax writes run folders with local file APIs. Mount the "
            "bucket (e.g. gcsfuse on every host) and give the mounted path."
        )
    return os.path.abspath(os.path.expanduser(path))
