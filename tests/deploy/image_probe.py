"""Run by the image's interpreter (``<venv>/bin/python image_probe.py EXTRA...``): what
the installed venv holds, as JSON on stdout. Only the standard library and the project,
since that is all the venv has.

Prints: where ``adapter`` was imported from, the requirements of the given extras that
are not installed, the class behind every storage type and runtime, and which
development tools are importable (the image should hold none).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import json
import re
import sys

#: modules each storage extra must make importable
EXTRA_MODULES = {
    "s3": ["boto3"],
    "gcs": ["google.cloud.storage", "google_crc32c"],
    "azure": ["azure.storage.blob", "azure.identity"],
}
DEVELOPMENT = ("pip", "setuptools", "pytest", "moto", "mypy", "ruff")


def missing_requirements(extras: list[str]) -> list[str]:
    missing = []
    for requirement in md.distribution("modelmesh-sidecar").requires or []:
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if extra is None or extra.group(1) not in extras:
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert name is not None
        try:
            md.distribution(name.group(0))
        except md.PackageNotFoundError:
            missing.append(name.group(0))
    return missing


def main(extras: list[str]) -> None:
    import adapter
    from adapter.plugin import available_runtimes, load_runtime_class
    from puller.storage.registry import known_types, storage_class

    for extra in extras:
        for module in EXTRA_MODULES[extra]:
            importlib.import_module(module)
    report = {
        "adapter": adapter.__file__,
        "missing": missing_requirements(extras),
        "storage": {name: storage_class(name).__name__ for name in known_types()},
        "runtimes": {name: load_runtime_class(name).__name__ for name in available_runtimes()},
        "development": [name for name in DEVELOPMENT if importlib.util.find_spec(name) is not None],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
