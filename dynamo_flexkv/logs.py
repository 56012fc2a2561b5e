"""One log line per event, with ids, prefixed so it stands out in vLLM's and Dynamo's output."""

from __future__ import annotations

import logging

_FORMAT = "%(levelname)s %(asctime)s [dynamo_flexkv %(process)d] %(message)s"


def configure_logging(level: str) -> None:
    logger = logging.getLogger("dynamo_flexkv")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
