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


def redact_url(url: str) -> str:
    """`url` fit for a log line, an error or a label: a password in it becomes `***`
    (redis://user:secret@host:6379 -> redis://user:***@host:6379). Stdlib only: config.py and every
    backend use it."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpath = rest.rpartition("@")  # the last @: a password may hold '/', '?' or '@'
    if not sep or not at:
        return url
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hostpath}"
