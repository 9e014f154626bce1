"""ImageNet backbone weights for ``use_pretrained_model=1``, fetched only when asked.

``detforge weights download NETWORK`` (``download_backbone``) puts torchvision's ImageNet weights of a
``base_network`` where training reads them, the torch hub cache (``$TORCH_HOME/hub/checkpoints``), with
a progress bar, checking the sha256 prefix in the file name as torchvision does; ``weights_status``
says which are there. Nothing else in detforge downloads: training with ``use_pretrained_model=1``
and no cached file stops with an error naming this command (``models._pretrained``).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from urllib.parse import urlparse

from detforge.errors import ConfigError, ModelError
from detforge.models import BASE_NETWORKS, backbone_weights, backbone_weights_file


@dataclass
class BackboneWeights:
    """One ``base_network``'s ImageNet weights: where they belong, where they come from, whether cached."""

    base_network: str
    path: str
    url: str
    cached: bool


def weights_status(base_network: str) -> BackboneWeights:
    """Where ``base_network``'s ImageNet weights live and whether they are there."""
    if base_network not in BASE_NETWORKS:
        raise ConfigError(
            f"unknown base_network {base_network!r}; choose one of {', '.join(BASE_NETWORKS)}",
            field="base_network",
        )
    path = backbone_weights_file(base_network)
    return BackboneWeights(base_network, path, backbone_weights(base_network).url, os.path.exists(path))


def download_backbone(base_network: str, *, url: str | None = None, progress: bool = True) -> BackboneWeights:
    """Download ``base_network``'s ImageNet weights into the torch hub cache (nothing when cached).

    ``url`` defaults to torchvision's; a ``-<hex>.`` in its file name is the sha256 prefix the download
    must have (ModelError otherwise, and nothing is left in the cache).
    """
    import torch

    status = weights_status(base_network)
    if status.cached:
        return status
    source = url or status.url
    match = re.search(r"-([a-f0-9]+)\.", os.path.basename(urlparse(source).path))
    os.makedirs(os.path.dirname(status.path), exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".download-", dir=os.path.dirname(status.path))
    os.close(handle)
    try:
        torch.hub.download_url_to_file(
            source, partial, hash_prefix=match.group(1) if match else None, progress=progress
        )
        os.replace(partial, status.path)
    except RuntimeError as exc:  # torch.hub's hash mismatch
        raise ModelError(
            f"the download of {source} is not the expected file: {exc}",
            path=status.path,
            hint="nothing was written; try again",
        ) from None
    except OSError as exc:
        raise ModelError(
            f"cannot download {source}: {exc}",
            path=status.path,
            hint="nothing was written; check the network, or put the file there yourself",
        ) from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return weights_status(base_network)
