"""Whether the Hugging Face Hub can be reached, asked once per process before the first lookup.

Unreachable, huggingface_hub retries each request for ~25 s before giving up. univ instead tries
one TCP connection (3 s); when it fails, the process switches to offline mode, so what is in the
local Hugging Face cache still loads at once and what is not fails with a line that says why.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

OFFLINE_HINT = ("set HF_HUB_OFFLINE=1 to use only the local Hugging Face cache, pass local folders, or try univ "
                "offline (README: 'Trying univ without the Hub')")


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection proves nothing: leave it to huggingface_hub
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def go_offline_unless_reachable() -> None:
    """Call before a Hub lookup. Offline already (HF_HUB_OFFLINE=1): nothing to do."""
    if offline() or reachable():
        return
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported later (datasets reads it at import)
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def unreachable() -> bool:
    """The Hub was found unreachable in this process (so a miss is not the name's fault)."""
    return reachable.cache_info().currsize > 0 and not reachable()
