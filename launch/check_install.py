#!/usr/bin/env python3
"""Import every module of the installed blt_jax: a subpackage left out of the install fails here, at build
time, instead of at a pod's first real command (the `blt` entry point imports its subcommands lazily).

    python launch/check_install.py                 # every module the installed package holds
    python launch/check_install.py --source REPO   # every module of the source tree REPO, imported from the
                                                   # installed copy (none may come from REPO itself)
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

# The subpackages every install must hold, whatever the source tree looks like.
REQUIRED = ("blt_jax.data", "blt_jax.model", "blt_jax.generation", "blt_jax.train", "blt_jax.tasks")


def source_modules(repo: Path) -> list[str]:
    """Module names of every `.py` file under REPO/blt_jax."""
    names = []
    for f in sorted((repo / "blt_jax").rglob("*.py")):
        parts = f.relative_to(repo).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def installed_modules() -> list[str]:
    import blt_jax  # noqa: PLC0415

    return ["blt_jax"] + [m.name for m in pkgutil.walk_packages(blt_jax.__path__, "blt_jax.")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, help="the repository the install was built from")
    args = p.parse_args(argv)
    repo = args.source.resolve() if args.source else None
    names = sorted(set(REQUIRED) | set(source_modules(repo) if repo else installed_modules()))
    failures = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (report every failure, not just the first)
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        where = Path(getattr(module, "__file__", "") or "").resolve()
        if repo is not None and where.is_relative_to(repo):
            failures.append(f"{name}: imported from the source tree ({where}), not from the install")
    for line in failures:
        print(f"check_install: {line}", file=sys.stderr)
    if failures:
        return 1
    import blt_jax  # noqa: PLC0415

    print(f"check_install: {len(names)} modules import from {Path(blt_jax.__file__).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
