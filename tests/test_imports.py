"""The core depends on torch, einops and numpy only: never on hydra or a modality package.

The training machinery (scm_mm/train, scm_mm/data.py) also writes safetensors checkpoints, a tqdm bar
and TensorBoard logs, and joins SLURM jobs through submitit when that optional package is present.
"""

import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[1] / "scm_mm"
ALLOWED = {"torch", "einops", "numpy", "xformers", "triton", "scm_mm"}  # xformers/triton: optional, imported lazily
TRAINING = {"safetensors", "tqdm", "submitit"}  # scm_mm/train and scm_mm/data.py only (TensorBoard via torch)


def _allowed(path: pathlib.Path) -> set[str]:
    parts = path.relative_to(CORE).parts
    return ALLOWED | TRAINING if parts[0] in ("train", "data.py") else ALLOWED


def test_core_imports_only_allowed_packages():
    stdlib = set(sys.stdlib_module_names)
    offenders = []
    for path in CORE.rglob("*.py"):
        if "app" in path.relative_to(CORE).parts:  # the Hydra app layer may import hydra
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in _allowed(path):
                    offenders.append(f"{path.relative_to(CORE)}: {name}")
    assert not offenders, offenders


def test_importing_the_core_loads_no_hydra_and_no_modality():
    code = (
        "import sys, scm_mm, scm_mm.nn.attention, scm_mm.nn.unet, scm_mm.nn.dit, scm_mm.nn.mlp, scm_mm.train, "
        "scm_mm.metrics; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('hydra', 'omegaconf', 'scm_mm_image', 'scm_mm_audio', 'scm_mm_video')]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pyproject_lists_every_package():
    import tomllib

    root = CORE.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in CORE.rglob("__init__.py")}
    found |= {"scm_mm_configs"} | {p.parent.name for p in (root / "modalities").glob("*/__init__.py")}
    found |= {"scm_mm_image." + ".".join(p.parent.relative_to(root / "modalities" / "scm_mm_image").parts)
              for p in (root / "modalities" / "scm_mm_image").rglob("*/__init__.py")}
    # Config groups are namespace packages of .yaml files: unlisted, setuptools warns and may drop them.
    configs = root / "configs"
    found |= {"scm_mm_configs." + ".".join(d.relative_to(configs).parts)
              for d in configs.rglob("*") if d.is_dir() and d.name != "__pycache__"}
    assert listed == found


def test_the_presets_and_the_gpu_benchmarks_import_without_media_packages():
    """bench/gpu_checks.sh runs on a GPU image without PyAV, soundfile, librosa, diffusers or Hydra."""
    blocked = ("av", "soundfile", "librosa", "diffusers", "hydra", "omegaconf")
    code = (
        f"import sys\nfor name in {blocked}: sys.modules[name] = None\n"
        "import scm_mm_image.presets, scm_mm_video.presets, scm_mm_video.vae_train, scm_mm_audio.vocoder_train\n"
        "import runpy\nsys.argv = ['step_time.py', '--help']\n"
        "try:\n    runpy.run_path('bench/step_time.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CORE.parent, capture_output=True)
