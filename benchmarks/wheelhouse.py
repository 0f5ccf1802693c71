"""The GPU check's wheelhouse: what a bare CUDA box lacks to run nfsd-nerf, as wheels, without a network.

``build`` (``make wheelhouse``, on a machine with a package index) asks pip to resolve the project
and its test requirements (the ``dev`` extra but :data:`NOT_FOR_THE_BOX`) for CPython 3.12 on
manylinux x86_64, keeps the part of that closure a GPU box does not already have (:data:`BOX_HAS`
and everything they need are there; torch is never fetched), and downloads it, plus the project's
own wheel and a ``requirements.txt`` naming what to install, into one folder that must stay under
:data:`MAX_BYTES` (what travels to the box). A dependency published only as an sdist is built
into a wheel here (pure-Python ones only: the box has no index to fall back on).

``install`` (``make gpu-check``, on the box) installs from that folder alone into the running
Python: a normal resolve first, which leaves every package the box already satisfies (torch
above all) untouched; if the box's versions conflict with a pin, the folder's wheels for the
packages the box lacks are installed with ``--no-deps`` instead and ``pip check`` says what is
off. Standard library only, so it runs on the box before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")
MAX_BYTES = 64 * 2**20
"""What may travel to a GPU box with the working tree."""

BOX_HAS = ("torch", "numpy", "scipy", "transformers", "huggingface-hub", "safetensors", "accelerate", "typer",
           "rich", "pyyaml", "imageio", "pillow", "pytest", "ninja")
"""What the GPU boxes this project borrows already have (with CUDA torch 2.11 on Python 3.12)."""

NOT_FOR_THE_BOX = ("ray", "playwright")
"""Dev requirements the GPU check does not use: ray (``nfsd-nerf batch`` in parallel) is a 76 MiB wheel,
playwright (the report page's browser test) 51 MiB."""

CONSTRAINTS = ("imageio-ffmpeg<0.8",)
"""imageio-ffmpeg 0.8's wheel bundles a 65 MiB ffmpeg, alone over :data:`MAX_BYTES`; 0.7's is 28 MiB."""


def canonical(name: str) -> str:
    """PEP 503 name: ``PyMCubes`` and ``pymcubes``, ``huggingface_hub`` and ``huggingface-hub`` match."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- build (networked machine)


def build(folder: Path, box_has: tuple[str, ...] = BOX_HAS) -> list[Path]:
    """Fill ``folder`` (emptied first) with the project's wheel and the wheels of what the box lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), str(ROOT))
    project = next(folder.glob("nfsd_nerf-*.whl"))
    tests = check_requirements()
    (folder / "requirements.txt").write_text("".join(f"{r}\n" for r in ["nfsd-nerf", *tests]))
    report = _resolve([str(project), *tests], folder)
    pins = needed(report, {canonical(n) for n in box_has})
    _pip("download", "--no-deps", "-q", "-d", str(folder), *_target_flags(), "--find-links", str(folder),
         *[f"{name}=={version}" for name, version in sorted(pins.items()) if name != "nfsd-nerf"])
    wheels = sorted(folder.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"wheelhouse: {len(wheels)} wheels, {total / 2**20:.1f} MiB in {folder}")
    if total >= MAX_BYTES:
        raise SystemExit(f"error: the wheelhouse is {total / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB "
                         "that travel to a GPU box")
    return wheels


def check_requirements() -> list[str]:
    """The project's ``dev`` extra without :data:`NOT_FOR_THE_BOX`: what ``pytest -m cuda`` needs."""
    import tomllib

    from packaging.requirements import Requirement

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    return [r for r in dev if canonical(Requirement(r).name) not in NOT_FOR_THE_BOX]


def needed(report: dict, box_has: set[str]) -> dict[str, str]:
    """{name: version} reachable from the requested packages (with their extras) without passing
    through a package the box has: pip's resolution report (``pip install --report``) walked by hand."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.0",
           "implementation_version": f"{PYTHON_VERSION}.0", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
           "platform_python_implementation": "CPython"}
    items = {canonical(i["metadata"]["name"]): i for i in report["install"]}
    roots = [(canonical(i["metadata"]["name"]), tuple(i.get("requested_extras") or ()))
             for i in report["install"] if i.get("requested")]
    out: dict[str, str] = {}
    todo, seen = list(roots), set()
    while todo:
        name, extras = todo.pop()
        if name in box_has or name not in items or (name, extras) in seen:
            continue
        seen.add((name, extras))
        out[name] = items[name]["metadata"]["version"]
        for line in items[name]["metadata"].get("requires_dist") or ():
            req = Requirement(line)
            if any(req.marker is None or req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                todo.append((canonical(req.name), tuple(sorted(req.extras))))
    return out


def _resolve(requirements: list[str], folder: Path, attempts: int = 5) -> dict:
    """pip's resolution of ``requirements`` for the target; sdist-only dependencies are built into ``folder``."""
    with tempfile.TemporaryDirectory() as tmp:
        report_path, constraints = Path(tmp) / "report.json", Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{c}\n" for c in CONSTRAINTS))
        for _ in range(attempts):
            result = _pip("install", "--dry-run", "--ignore-installed", "-q", "--report", str(report_path),
                          "--constraint", str(constraints),
                          "--target", str(Path(tmp) / "target"), *_target_flags(), "--find-links", str(folder),
                          *requirements, check=False)
            if result.returncode == 0:
                return json.loads(report_path.read_text())
            missing = re.search(r"No matching distribution found for (\S+)", result.stderr)
            if not missing:
                raise SystemExit(f"error: pip could not resolve the project for Python {PYTHON_VERSION}:\n"
                                 f"{result.stderr.strip()}")
            _build_pure_wheel(missing.group(1), folder)
    raise SystemExit(f"error: still unresolved after building {attempts} wheels from sdists")


def _build_pure_wheel(requirement: str, folder: Path) -> None:
    """Build ``requirement`` from its sdist; only a pure-Python wheel can serve another Python version."""
    before = set(folder.glob("*.whl"))
    _pip("wheel", "--no-deps", "-q", "-w", str(folder), requirement)
    for wheel in set(folder.glob("*.whl")) - before:
        if not wheel.name.endswith("-none-any.whl"):
            wheel.unlink()
            raise SystemExit(f"error: {requirement} has no wheel for CPython {PYTHON_VERSION} on manylinux "
                             f"x86_64 and is not pure Python; build it on a machine like the GPU box")
        print(f"built {wheel.name} from its sdist")


def _target_flags() -> list[str]:
    flags = ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def _pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"error: pip {args[0]} failed:\n{result.stderr.strip()}")
    return result


# --------------------------------------------------------------------------- install (the GPU box)


def install(folder: Path) -> int:
    """Install the project from ``folder`` alone into this Python; returns 0, or 1 if nothing could be installed."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"error: no wheels in {folder}; run `make wheelhouse` on a machine with a package index first")
        return 1
    env = {**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    if subprocess.run([*base, "-r", str(folder / "requirements.txt")], env=env).returncode == 0:
        return 0
    installed = {canonical(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    lacking = [w for w in wheels if canonical(w.name.split("-")[0]) not in installed or w.name.startswith("nfsd_nerf-")]
    print(f"the box's packages conflict with a pin: installing {len(lacking)} wheels without dependencies",
          flush=True)
    if subprocess.run([*base, "--no-deps", *map(str, lacking)], env=env).returncode != 0:
        return 1
    subprocess.run([sys.executable, "-m", "pip", "check"], env=env)  # informative only
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "install"))
    parser.add_argument("folder", nargs="?", type=Path, default=ROOT / "wheelhouse")
    args = parser.parse_args()
    if args.action == "build":
        build(args.folder)
    else:
        sys.exit(install(args.folder))


if __name__ == "__main__":
    main()
