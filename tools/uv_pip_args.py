"""Print pip's configuration as ``uv pip install`` options, one per line.

``make setup`` installs with uv (Astral's installer: the same resolution as pip, in a fraction of
the time), which does not read pip's configuration files or PIP_* variables. A host whose pip is
configured with find-links, extra index URLs or constraints (``pip config list``) gets the same
ones from uv. Run with the interpreter whose pip is configured; standard library only.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

#: pip's option -> uv's; each value of a pip option may hold several entries (space-separated).
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
           "find-links": "--find-links", "constraint": "--constraint"}


#: The sections ``pip install`` reads, lowest precedence first: a configuration file's
#: ``[global]``, its ``[install]``, then PIP_* variables (``:env:``). Other sections (``[freeze]``,
#: ...) are other commands'.
SCOPES = ["global", "install", ":env:"]


def pip_config() -> dict[str, list[str]]:
    """``{option: [values]}`` from ``pip config list``, each option from the scope pip uses."""
    res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True, check=True)
    found: dict[str, tuple[int, list[str]]] = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition("=")
        scope, _, option = key.rpartition(".")
        if sep and option in OPTIONS and scope in SCOPES:
            rank = SCOPES.index(scope)
            if rank >= found.get(option, (-1, []))[0]:
                found[option] = (rank, " ".join(shlex.split(value)).split())
    return {option: values for option, (_, values) in found.items()}


def main() -> None:
    for option, values in pip_config().items():
        for value in values:
            print(f"{OPTIONS[option]}={value}")


if __name__ == "__main__":
    main()
