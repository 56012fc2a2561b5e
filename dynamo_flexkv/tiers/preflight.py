"""Start-up checks of the settings against the machine, run before vLLM allocates anything.

`config.load_settings(checks=preflight)` runs them once every value is valid and reports each problem
on its own line, in the user's spelling of the setting. Each plane checks what it owns: the SSD tier
its directories, free space and I/O engine; the store registry the cluster store's URL.
"""

from __future__ import annotations

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.storage.backend import StoreUrlError, parse_store_url
from dynamo_flexkv.storage.ssd.preflight import preflight as ssd_preflight


def preflight(settings: FlexKVSettings) -> list[tuple[str, str]]:
    """`(setting, reason)` for every problem that would stop a tier from starting under `settings`."""
    problems = ssd_preflight(settings)
    if settings.remote_store is not None:
        try:
            parse_store_url(settings.remote_store)
        except StoreUrlError as exc:
            problems.append(("remote_store", exc.reason))
    return problems
