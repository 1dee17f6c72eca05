"""The slug-size limit: a push whose slug is bigger is refused before it is stored.

A slug is the gzipped tar of the built ``/app``; every host that runs the app
fetches and unpacks it, so its size is paid on every deploy and every new job.
Heroku refuses slugs over 500 MB; flynnp2p's default limit is 512 MiB
compressed, a cluster setting (``FLYNNP2P_SLUG_MAX_MB``, read by
`flynnp2p.config.slug_max_mb`). The build step checks it once the slug is
packed (`flynnp2p.build.deploy.BuildStep`), so nothing of a refused push is
stored or released and the running release keeps serving.
"""

from __future__ import annotations

DEFAULT_SLUG_MAX_MB = 512
MIB = 1 << 20


def slug_too_big(size: int, limit: int) -> str | None:
    """Why a slug of `size` bytes is refused under `limit` bytes (None: it fits)."""
    if size <= limit:
        return None
    return (
        f"the slug is {size / MIB:.1f} MiB compressed, over this cluster's limit of "
        f"{limit / MIB:.0f} MiB (FLYNNP2P_SLUG_MAX_MB): list what the app does not need at run "
        "time (tests, docs, data, build tools, large assets) in a .slugignore file, or keep "
        "large files out of the repository"
    )
