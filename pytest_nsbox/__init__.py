"""pytest-nsbox: a fresh Linux container for every test, built from kernel primitives.

Use the ``nsbox`` fixture in pytest, or ``Box`` directly::

    from pytest_nsbox import Box

    with Box(hostname="web") as box:
        print(box.run("hostname").stdout)
"""

from __future__ import annotations

from .box import Box, live_boxes
from .cluster import Cluster
from .disks import Disk
from .errors import (
    ArgumentTypeError,
    BoxError,
    CgroupError,
    CommandNotFoundError,
    ConfigError,
    HostUnsupportedError,
    ImageError,
    MountError,
    NetworkError,
    NsboxError,
    ProcessExitedError,
    RegistryError,
    RootlessError,
    StateError,
    SyscallError,
    TemplateError,
    WaitTimeoutError,
)
from .image import Image, ImageConfig
from .image_files import Healthcheck
from .netpair import NetPair
from .network import Link
from .overlay import Changes, OverlayRoot
from .process import BoxProcess, CommandFailedError, CommandTimeoutError, RunResult
from .spec import BoxSpec
from .templates import Template, TemplateCacheWarning, template

__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError",
    "Box",
    "BoxError",
    "BoxProcess",
    "BoxSpec",
    "CgroupError",
    "Changes",
    "Cluster",
    "CommandFailedError",
    "CommandNotFoundError",
    "CommandTimeoutError",
    "ConfigError",
    "Disk",
    "Healthcheck",
    "HostUnsupportedError",
    "Image",
    "ImageConfig",
    "ImageError",
    "Link",
    "MountError",
    "NetPair",
    "NetworkError",
    "NsboxError",
    "OverlayRoot",
    "ProcessExitedError",
    "RegistryError",
    "RootlessError",
    "RunResult",
    "StateError",
    "SyscallError",
    "Template",
    "TemplateCacheWarning",
    "TemplateError",
    "WaitTimeoutError",
    "live_boxes",
    "template",
]
