"""A side environment with transformers 5 for the export tests, beside the main environment.

mosaicml-streaming pins transformers < 5 in the main environment, while NemotronH is native from
transformers 5. The export test loads an export in a subprocess whose PYTHONPATH starts with a
cache directory holding transformers 5 and only those of its dependencies that the main
environment lacks or has at a version transformers 5 refuses (huggingface_hub 1.x, tokenizers
0.23, ...). torch, numpy, safetensors and the rest come from the main environment, untouched.

    path, reason = ensure_side_env()   # path: the directory for PYTHONPATH ("" when the main
                                       # environment already has transformers >= 5), None + reason
                                       # when it cannot be had (then the test skips with reason)

The directory is ~/.cache/hybrid-pretrain/transformers5 (override: HYBRID_PRETRAIN_TRANSFORMERS5_DIR)
and is reused once it holds a READY stamp. Installing it needs pip and a package index; it takes
about a minute the first time (70-80 s measured, 15 packages, ~160 MB). `python tests/export/side_env.py`
installs it and prints the path; HYBRID_PRETRAIN_NO_SIDE_ENV=1 skips the tests that need it.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REQUIREMENT = "transformers>=5,<6"
CHECK = (
    "import transformers; from transformers import AutoModelForCausalLM, NemotronHForCausalLM; "
    "print(transformers.__version__)"
)


def cache_dir() -> Path:
    env = os.environ.get("HYBRID_PRETRAIN_TRANSFORMERS5_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hybrid-pretrain" / "transformers5"


def main_env_has_transformers5() -> bool:
    try:
        from importlib.metadata import version

        return int(version("transformers").split(".")[0]) >= 5
    except Exception:
        return False


def side_env(path: str) -> dict[str, str]:
    """The environment for a subprocess that runs in the side environment at `path`."""
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path] + [p for p in [env.get("PYTHONPATH", "")] if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return env


def _check(path: str) -> tuple[bool, str]:
    # not from the repository root: `python -c` puts the working directory first on sys.path, and our
    # top-level `kernels` package would shadow Hugging Face's `kernels`, which transformers >= 5.2x imports
    proc = subprocess.run([sys.executable, "-c", CHECK], env=side_env(path), capture_output=True, text=True,
                          timeout=300, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or ["?"])[-1]
    version = proc.stdout.strip().splitlines()[-1]
    if int(version.split(".")[0]) < 5:
        return False, f"found transformers {version}, not >= 5"
    return True, version


def _needed(report: dict) -> list[str]:
    """name==version for transformers and, transitively from what gets installed, each dependency that
    the main environment lacks or has at a version the requirement refuses. A dependency the main
    environment satisfies is used from there, together with its own (already installed) dependencies."""
    from importlib.metadata import PackageNotFoundError, version
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    needed, todo = set(), ["transformers"]
    while todo:
        name = todo.pop()
        if name in needed or name not in items:
            continue
        needed.add(name)
        for text in items[name]["metadata"].get("requires_dist") or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            try:
                have = version(dep)
            except PackageNotFoundError:
                have = None
            if have is None or not req.specifier.contains(have, prereleases=True):
                todo.append(dep)
    return sorted(f"{n}=={items[n]['metadata']['version']}" for n in needed)


def _install(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
               "--timeout", "30", "--retries", "2"]  # fail within minutes when no index can be reached
        subprocess.run(pip + ["--dry-run", "--ignore-installed", "--report", report_path, REQUIREMENT],
                       check=True, capture_output=True, text=True, timeout=300)
        with open(report_path) as f:
            needed = _needed(json.load(f))
        staging = Path(tmp) / "site"
        subprocess.run(pip + ["--no-deps", "--target", str(staging)] + needed,
                       check=True, capture_output=True, text=True, timeout=600)
        (staging / "bin").exists() and shutil.rmtree(staging / "bin")
        (staging / "INSTALLED.txt").write_text("\n".join(needed) + "\n")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))


@functools.lru_cache(maxsize=None)
def ensure_side_env() -> tuple[str | None, str]:
    """(PYTHONPATH entry or "" for the main environment, transformers version) or (None, why not)."""
    if os.environ.get("HYBRID_PRETRAIN_NO_SIDE_ENV"):
        return None, "HYBRID_PRETRAIN_NO_SIDE_ENV is set"
    if main_env_has_transformers5():
        ok, info = _check("")
        if ok:
            return "", info
    target = cache_dir()
    ready = target / "READY"
    if ready.is_file() and (target / "transformers" / "__init__.py").is_file():
        return str(target), ready.read_text().strip()  # checked when it was installed
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run installs once; the other waits here
        if ready.is_file():
            ok, info = _check(str(target))
            if ok:
                return str(target), info
        try:
            _install(target)
        except subprocess.CalledProcessError as err:
            tail = ((err.stderr or "") + (err.stdout or "")).strip().splitlines()[-3:]
            return None, f"cannot install {REQUIREMENT} into {target}: {' / '.join(tail) or err}"
        except (OSError, subprocess.TimeoutExpired) as err:
            return None, f"cannot install {REQUIREMENT} into {target}: {err}"
        ok, info = _check(str(target))
        if not ok:
            return None, f"installed {REQUIREMENT} into {target} but it does not import: {info}"
        ready.write_text(info + "\n")
        return str(target), info


if __name__ == "__main__":
    path, info = ensure_side_env()
    print(f"side environment: {path!r} ({info})" if path is not None else f"unavailable: {info}")
    sys.exit(0 if path is not None else 1)
