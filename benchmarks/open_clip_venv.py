"""A venv for open_clip_train that borrows torch and open_clip from .venv but has its own webdataset.

open_clip_train needs pandas and an old webdataset: its wheel's `training` extra pins
webdataset<=0.2.86 (1.0, which .venv has, breaks it, and so does 0.2.111, whose end-of-shard
markers its sample grouper cannot read). A second torch install would cost ~5.5 GB, so the venv
holds only those two (numpy pinned to .venv's) and reaches everything else through a .pth file.
A .pth line is appended to sys.path after the venv's own site-packages, so its webdataset shadows
.venv's; `check` proves it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-openclip"
PYTHON = VENV / "bin" / "python"
WEBDATASET = "webdataset>=0.2.5,<=0.2.86"  # open_clip_torch's own `training` extra
# open_clip_train has no flag for user model configs: register the JSON, then run its main().
ENTRY = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; sys.exit(main(sys.argv[2:]) or 0)"
)
_PROBE = (
    "import json, sys, webdataset, torch, open_clip, open_clip_train.main, pandas; "
    "print(json.dumps({'webdataset': webdataset.__version__, 'webdataset_file': webdataset.__file__, "
    "'torch_file': torch.__file__, 'open_clip': open_clip.__version__}))"
)


def create() -> None:
    """Make the venv (idempotent): pip-install its two packages, then link .venv's site-packages."""
    if not PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    site = Path(_site_packages())
    # Installed before the .pth exists, so pip neither sees nor tries to replace .venv's packages.
    (site / "_main_venv.pth").unlink(missing_ok=True)
    subprocess.run(
        [
            str(PYTHON),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            WEBDATASET,
            "pandas",
            f"numpy=={numpy.__version__}",
        ],
        check=True,
    )
    (site / "_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def _site_packages() -> str:
    out = subprocess.run(
        [str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def check() -> dict[str, str]:
    """What the venv imports; raises SystemExit with the fix when it is missing or resolves wrongly."""
    if not PYTHON.exists():
        raise SystemExit(f"{VENV} does not exist; run: python benchmarks/vs_open_clip.py --setup")
    out = subprocess.run([str(PYTHON), "-c", _PROBE], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(
            f"{VENV} cannot import open_clip_train: {out.stderr.strip().splitlines()[-1]}; "
            "run: python benchmarks/vs_open_clip.py --setup"
        )
    found = json.loads(out.stdout)
    if not found["webdataset"].startswith("0.2.") or not found["webdataset_file"].startswith(str(VENV)):
        raise SystemExit(
            f"{VENV} imports webdataset {found['webdataset']} from {found['webdataset_file']}, "
            "not its own 0.2.x; run: python benchmarks/vs_open_clip.py --setup"
        )
    return found
