"""The core depends on torch, einops and numpy only: never on hydra or a modality package."""

import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[1] / "scm_mm"
ALLOWED = {"torch", "einops", "numpy", "xformers", "triton", "scm_mm"}  # xformers/triton: optional, imported lazily


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
                if top not in stdlib and top not in ALLOWED:
                    offenders.append(f"{path.relative_to(CORE)}: {name}")
    assert not offenders, offenders


def test_importing_the_core_loads_no_hydra_and_no_modality():
    code = (
        "import sys, scm_mm, scm_mm.nn.attention, scm_mm.nn.unet, scm_mm.nn.dit, scm_mm.nn.mlp, scm_mm.train, "
        "scm_mm.metrics; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('hydra', 'omegaconf', 'scm_mm_image', 'scm_mm_audio', 'scm_mm_video')]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
