"""The wheel: built from the repo's files, installed apart from the source tree, run from an empty directory.

Issue 3 asks the Hydra apps to work from a non-editable install; an editable one hides a config group or
a module missing from the wheel, because it reads the source tree. Offline: no build isolation, no deps.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "scm_mm", "modalities", "configs")


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command that must succeed; its stderr is the failure's message."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_wheel_ships_every_config_and_runs_from_any_directory(tmp_path):
    src = tmp_path / "src"  # a copy, so the build's build/ and egg-info stay out of the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    dist = tmp_path / "dist"
    build = run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src), cwd=tmp_path)
    assert "Warning" not in build.stdout + build.stderr, build.stderr  # e.g. a config group left out of `packages`
    (wheel,) = dist.glob("scm_mm-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = {"scm_mm_configs/" + p.relative_to(ROOT / "configs").as_posix()
               for p in (ROOT / "configs").rglob("*.yaml")}  # fmt: skip
    assert configs <= shipped, sorted(configs - shipped)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in shipped), "the licence is not in the wheel"

    site, cwd = tmp_path / "site", tmp_path / "empty"
    run(*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path)
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install in site-packages
    code = "import scm_mm as a, scm_mm_configs as b, scm_mm_image as c; print(a.__file__, b.__file__, c.__file__)"
    where = run(sys.executable, "-c", code, cwd=cwd, env=env).stdout.split()
    assert all(Path(path).is_relative_to(site) for path in where), where

    runs = tmp_path / "runs"  # the console scripts, as pip wrote them
    run(str(site / "bin" / "scm-mm-train"), "experiment=mnist_teacher", f"run_dir={runs / 'teacher'}",
        "train.iters=2", "train.batch_size=8", "train.sample_every=2", "preview.n=4", "sampler.steps=2",
        "train.progress=false", "device=cpu", cwd=cwd, env=env)  # fmt: skip
    run(str(site / "bin" / "scm-mm-sample"), f"checkpoint={runs / 'teacher'}", "solver=heun", "steps=2", "n=4",
        f"out={runs / 'digits.png'}", "device=cpu", cwd=cwd, env=env)  # fmt: skip
    assert Image.open(runs / "digits.png").size >= (32, 32)  # four 16x16 digits
    assert not any(cwd.iterdir()), sorted(cwd.iterdir())  # nothing written where the commands ran
