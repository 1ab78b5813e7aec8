"""Fail when pyproject.toml asks for something the installed lock does not provide.

`make setup` installs requirements/all.txt with --no-deps and then the project with --no-deps, so nothing
resolves the project's own requirements at install time: a dependency added to pyproject.toml without
`make lock` would be silently missing. This compares the installed project's declared requirements (with
the extras the Makefile installs) against what is installed and names what `make lock` has to fix.
"""

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "rag-backend"
EXTRAS = ("dev", "llm", "eval")


def problems() -> list[str]:
    found = []
    for line in metadata.requires(PROJECT) or []:
        req = Requirement(line)
        envs = [{"extra": extra} for extra in ("", *EXTRAS)]
        if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
            continue
        try:
            installed = metadata.version(canonicalize_name(req.name))
        except metadata.PackageNotFoundError:
            found.append(f"{req} is not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            found.append(f"{req} but {req.name} {installed} is installed")
    return found


if __name__ == "__main__":
    missing = problems()
    for problem in missing:
        print(f"lock out of date: {problem}", file=sys.stderr)
    if missing:
        print("pyproject.toml and requirements/all.txt disagree: run `make lock` and commit the lock", file=sys.stderr)
    sys.exit(1 if missing else 0)
