"""Checkpoints: safetensors for weights, a tensors-only training state, JSON metadata; written atomically.

A checkpoint is a directory `<run>/checkpoints/iter-<N>/` holding
    model.safetensors    the trained weights (the TrigFlowPrecond, adaptive-weight head included)
    ema.safetensors      every EMA average, keys prefixed "<name>." (e.g. "ema." or "ema-0.050.")
    state.pt             optimizer, grad scaler, iteration, samples seen, data position, RNG states
    rng-rank<R>.pt       each rank's random state (per-rank seeds), so a resumed run repeats itself
    meta.json            how to rebuild the model (a JSON spec), the codec settings, the run config
It is written into `iter-<N>.tmp-<pid>`, flushed to disk (fsync) and renamed into place only when complete,
so a run killed while saving, or a machine that crashes, leaves the previous checkpoint intact; pruning deletes
older checkpoints only once the new one is on disk. What a killed writer leaves (`*.tmp-<pid>`, `*.old-<pid>`)
is cleaned up when the next run starts (`remove_orphans`), and `resume="auto"` takes the newest checkpoint
that can be read (`checkpoint_problem`). A run that restarts from an older iteration sets the run's later
checkpoints aside into `checkpoints/superseded-<time>/` (`set_aside_later_checkpoints`).
Loading never unpickles arbitrary objects: safetensors for weights, `torch.load(weights_only=True)` for
the state, json for the rest.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^iter-(\d+)$")
_LEFTOVER = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-\d+$")  # what `writing_directory` names its folders

# The files the training loop's resume reads (rng-rank<R>.pt for every saved rank: the state says how many).
TRAIN_FILES = ("meta.json", "model.safetensors", "ema.safetensors", "state.pt", "rng-rank0.pt")

# Modules a checkpoint's spec may name. A spec is data from a file: restricting its targets to these
# packages keeps "load a checkpoint" from meaning "call any function" (cf. the unpickling rule).
ALLOWED_SPEC_PREFIXES = ("scm_mm.", "scm_mm_")


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:09d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints of a run, oldest first: its `iter-<N>` folders, complete unless a crash cut a file short
    (`checkpoint_problem` says); the `.tmp-*` and `.old-*` folders of a writer are not checkpoints."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path, marker: str = "meta.json") -> Path:
    """A run directory (its newest checkpoint that can be read, see `newest_readable`), a checkpoint
    directory (it holds `marker`: meta.json for the training loop's, state.pt for the autoencoder's and
    vocoder's), or a file inside one."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if (path / marker).is_file():
        return path
    if not list_checkpoints(path):
        raise _no_checkpoint(path, marker)
    return newest_readable(path, (marker,), "loaded")


def newest_readable(run: Path, files: Sequence[str], purpose: str) -> Path:
    """The newest checkpoint of `run` that `checkpoint_problem` passes; a newer one that it does not (left
    by a crash) is skipped with a warning naming it and why. None readable: a ValueError listing them."""
    unreadable = []
    for checkpoint in reversed(list_checkpoints(run)):
        problem = checkpoint_problem(checkpoint, files)
        if problem is None:
            return checkpoint
        warnings.warn(f"skipping checkpoint {checkpoint}: {problem}; trying the one before", stacklevel=3)
        unreadable.append(f"  {checkpoint.name}: {problem}")
    raise ValueError(
        f"no checkpoint of {run} can be read, so the run cannot be {purpose}:\n" + "\n".join(unreadable)
        + f"\nRepair them, or move them out of {run / CHECKPOINT_DIR}."
    )  # fmt: skip


def _no_checkpoint(path: Path, marker: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no checkpoint at {path}: expected a run directory with {CHECKPOINT_DIR}/iter-*/ or a checkpoint "
        f"directory holding {marker}"
    )


def checkpoint_problem(checkpoint: Path, required: Sequence[str]) -> str | None:
    """Why `checkpoint` cannot be resumed from (a missing, empty or cut-short file, bad JSON), or None.

    Cheap, without reading the weights: every `required` file (relative paths) exists; every safetensors
    file's header parses and covers the file exactly (a cut-short one does not); every torch.save file (.pt)
    has its zip directory and an intact pickle (checksum); every JSON file parses. Tensor bytes zeroed in
    place go unnoticed (safetensors keeps no checksum); the loaders then load the checkpoint once.
    """
    for name in required:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        name = path.relative_to(checkpoint).as_posix()
        if path.suffix in (".safetensors", ".pt", ".json") and path.stat().st_size == 0:
            return f"{name} is empty"
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix == ".pt":  # torch.save's zip: its directory is at the end, so a cut-short one has none
                with zipfile.ZipFile(path) as archive:
                    for member in archive.infolist():  # the pickle's checksum too, but not the tensors' bytes
                        if "/data/" not in member.filename:
                            archive.read(member)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as e:  # whichever parser refuses it, and however, the file cannot be loaded
            return f"{name} is cut short or corrupt ({type(e).__name__}: {e})"
    return None


def remove_orphans(run_dir: str | Path) -> str | None:
    """Clean up after writers killed mid-save in a run folder and its checkpoints; returns a one-line report.

    Of the folders `writing_directory` names, `<name>.tmp-<pid>` (unfinished) is deleted, and so is
    `<name>.old-<pid>` (the version a finished write replaced), unless `<name>` itself is gone (killed between
    the two renames): then it is renamed back. Folders this process is writing are left alone, whatever their
    pid (a restarted container may reuse the killed one's). Call on the main rank before it writes.
    """
    run, removed, restored = Path(run_dir), [], []
    for folder in (run, run / CHECKPOINT_DIR):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = _LEFTOVER.match(path.name)
            if match is None or not path.is_dir() or path.absolute() in _WRITING:
                continue
            name = path.relative_to(run).as_posix()
            if match["kind"] == "old" and not (target := folder / match["name"]).exists():
                os.replace(path, target)  # the complete previous version: put it back
                restored.append(f"{name} -> {target.name}")
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
    done = ([f"removed {', '.join(removed)}"] if removed else []) + (
        [f"restored {', '.join(restored)}"] if restored else []
    )
    return f"cleaned up after killed writers in {run}: " + "; ".join(done) if done else None


def resume_source(
    resume: str,                   # "auto", "never", or a run or checkpoint path
    run_dir: str | Path,           # the run that resumes
    marker: str = "meta.json",     # the file that marks a checkpoint folder (state.pt for the codec trainers)
    required: Sequence[str] = (),  # further files a checkpoint must hold to be resumed from
) -> Path | None:
    """The checkpoint a run restarts from: "auto" = the latest of run_dir (None in a new run), "never" =
    None, anything else = a run or checkpoint path (see `resolve_checkpoint`).

    The latest of a run is the newest one that can be read (`checkpoint_problem`): a newer one that cannot,
    left by a crash, is skipped with a warning naming it and why; if none can be read, a ValueError lists
    them. A checkpoint folder named explicitly must be readable. First the run folder is cleaned up after
    killed writers (`remove_orphans`), so call this once, at the start of a run, on the main rank.
    """
    if report := remove_orphans(run_dir):
        tqdm.write(report)
    if resume == "never":
        return None
    files = (marker, *required)
    run = Path(run_dir)
    if resume != "auto":
        run = Path(resume).parent if Path(resume).is_file() else Path(resume)
        if (run / marker).is_file():  # one checkpoint, named: that one, or an error
            if problem := checkpoint_problem(run, files):
                raise ValueError(f"cannot resume from {run}: {problem}")
            return run
    if not list_checkpoints(run):
        if resume == "auto":
            return None  # a new run
        raise _no_checkpoint(run, marker)
    return newest_readable(run, files, "resumed")


def prune_checkpoints(run_dir: str | Path, keep_last: int, newest: int) -> None:
    """Delete all but the newest `keep_last` checkpoints up to `newest`, the iteration just written; 0 keeps all.

    Later checkpoints are left alone and do not count, so the one just written is never deleted, even beside
    later ones (an abandoned timeline, or a checkpoint cut short by a crash): the run always keeps a readable
    checkpoint, as `writing_directory` has put the new one on disk before anything older is deleted.
    """
    if keep_last > 0:
        found = [p for p in list_checkpoints(run_dir) if checkpoint_iteration(p) <= newest]
        for old in found[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_iteration(checkpoint: Path) -> int:
    match = _NAME.match(checkpoint.name)
    if match is None:
        raise ValueError(f"{checkpoint} is not named like a checkpoint (iter-<N>)")
    return int(match.group(1))


def set_aside_later_checkpoints(run_dir: str | Path, iteration: int) -> list[Path]:
    """Move the checkpoints of a run later than `iteration` into `checkpoints/superseded-<time>/`; returns
    where they went. A run that restarts at `iteration` (resumed from an older checkpoint, e.g. to roll
    back past a divergence, or started over) abandons them: left in place, `resume="auto"` would continue
    the abandoned timeline and pruning would count them as newer than what this run writes. They are moved,
    not deleted, and no longer count as the run's checkpoints."""
    later = [p for p in list_checkpoints(run_dir) if checkpoint_iteration(p) > iteration]
    if not later:
        return []
    folder = Path(run_dir) / CHECKPOINT_DIR / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir()
    for path in later:
        os.replace(path, folder / path.name)
    return [folder / p.name for p in later]


def cpu_tensors(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict as contiguous CPU copies (what safetensors writes), keys prefixed."""
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    folder = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not folder:  # some filesystems refuse fsync on a folder: their renames are as durable as they get
            raise


_WRITING: set[Path] = set()  # the temporary folders this process is filling (never orphans)


@contextmanager
def writing_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` in one rename, so a
    reader (or a run killed while writing) sees either the old complete folder or the new one.

    Every file and folder in it is fsynced before the rename, and the parent folder after it, so that after a
    crash the new folder is complete or absent (without the fsyncs a file renamed into place can come back
    empty or cut short), and nothing older is deleted (by pruning) before the new folder is on disk.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    _WRITING.add(tmp.absolute())
    try:
        yield tmp
        for folder, _, names in os.walk(tmp, topdown=False):
            for name in names:
                fsync(Path(folder, name))
            fsync(Path(folder))
        if final.exists():  # os.replace cannot overwrite a non-empty directory: move the old one aside first
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _WRITING.discard(tmp.absolute())
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_module_folder(module: nn.Module, config: Mapping[str, Any], path: str | Path) -> Path:
    """A small model as a folder, written atomically: config.json (what rebuilds it) + model.safetensors."""
    with writing_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(cpu_tensors(module.state_dict()), str(tmp / "model.safetensors"))
    return Path(path)


def load_module_folder(path: str | Path, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, CPU weights) of a folder written by `save_module_folder`; `what` names it in errors."""
    folder = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{what} file '{folder / name}' not found: pass the folder its save() wrote")
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


def save_checkpoint(
    run_dir: str | Path,
    iteration: int,
    *,
    model: Mapping[str, torch.Tensor],            # full (unsharded) model state dict
    ema: Mapping[str, Mapping[str, torch.Tensor]],  # name -> state dict of each average
    state: dict[str, Any],                        # tensors, numbers, strings, lists and dicts only
    meta: dict[str, Any],                         # JSON-serialisable
    rank_states: Mapping[int, dict[str, Any]],    # rank -> that rank's random state
    keep_last: int = 3,                           # delete older checkpoints beyond this many; 0 keeps all
) -> Path:
    """Write one checkpoint atomically and durably, then prune older ones. Call on one rank (gather rank states
    first)."""
    final = Path(run_dir) / CHECKPOINT_DIR / checkpoint_name(iteration)
    with writing_directory(final) as tmp:  # the same iteration saved twice replaces the first (a final save)
        save_file(cpu_tensors(model), str(tmp / "model.safetensors"), metadata={"iteration": str(iteration)})
        ema_tensors: dict[str, torch.Tensor] = {}
        for name, sd in ema.items():
            ema_tensors.update(cpu_tensors(sd, prefix=f"{name}."))
        save_file(ema_tensors, str(tmp / "ema.safetensors"), metadata={"names": json.dumps(list(ema))})
        torch.save(state, tmp / "state.pt")
        for rank, rs in rank_states.items():
            torch.save(rs, tmp / f"rng-rank{rank}.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "iteration": iteration}, indent=2, default=str))
    prune_checkpoints(run_dir, keep_last, newest=iteration)
    return final


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((resolve_checkpoint(checkpoint) / "meta.json").read_text())


def load_weights(checkpoint: str | Path, which: str = "model") -> dict[str, torch.Tensor]:
    """`which` = "model" for the trained weights, or an EMA name ("ema", "ema-0.050", ...)."""
    ckpt = resolve_checkpoint(checkpoint)
    if which == "model":
        return load_file(str(ckpt / "model.safetensors"))
    names = ema_names(ckpt)
    if which not in names:
        raise KeyError(f"{ckpt} has no EMA named {which!r}; it has {names} (and 'model')")
    prefix = f"{which}."
    tensors = load_file(str(ckpt / "ema.safetensors"))
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def ema_names(checkpoint: str | Path) -> list[str]:
    """The averages in a checkpoint, in the order training listed them (the first is the default)."""
    with safe_open(str(resolve_checkpoint(checkpoint) / "ema.safetensors"), "pt") as f:
        return json.loads((f.metadata() or {}).get("names", "[]"))


def load_state(checkpoint: str | Path, rank: int | None = None) -> dict[str, Any]:
    """The training state, or with `rank` that rank's random state; tensors and plain data only."""
    ckpt = resolve_checkpoint(checkpoint)
    path = ckpt / ("state.pt" if rank is None else f"rng-rank{rank}.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


def import_target(target: object) -> Any:
    """The object a spec's `_target_` names, for scm-mm's own packages only (imported, not called)."""
    if not isinstance(target, str):
        raise ValueError(f"a model spec needs a '_target_' string, got {target!r}")
    if not target.startswith(ALLOWED_SPEC_PREFIXES):
        raise ValueError(f"refusing to build {target!r} from a checkpoint: only {ALLOWED_SPEC_PREFIXES} are allowed")
    module_name, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def weights_digest(state: Mapping[str, torch.Tensor], keep: Callable[[str], bool] = lambda name: True) -> str:
    """sha256 (16 hex digits) of the names and fp16 bytes of the tensors of `state` whose names `keep`, in
    name order: the same for an fp16 copy of the weights, another for another training."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if keep(name):
            digest.update(name.encode())
            digest.update(state[name].detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def spec_class(target: object, base: type) -> type:
    """The class a checkpoint's `_target_` names, if it is one of scm-mm's own subclasses of `base`. A
    checkpoint's meta.json is data: a target naming a function (scm-mm's own prune_checkpoints, say) would
    be called with the checkpoint's arguments, so it is refused before anything is called."""
    cls = import_target(target)
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise ValueError(f"refusing to build {target!r} from a checkpoint: it is not a {base.__name__} class")
    return cls


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """`{"_target_": "package.module.Name", **kwargs}` -> Name(**kwargs), for scm-mm's own nn.Module classes
    and registered preset builders only (`spec_class`).

    Nested specs (dicts with a `_target_`) are built first. This mirrors Hydra's instantiate for the
    JSON a checkpoint stores, so loading a model needs no Hydra.
    """
    spec = dict(spec)
    target = spec.pop("_target_", None)
    builder = import_target(target)  # importing a presets module registers its builders
    if target not in PRESET_BUILDERS:
        spec_class(target, nn.Module)
    kwargs = {k: build_from_spec(v) if isinstance(v, Mapping) and "_target_" in v else v for k, v in spec.items()}
    module = builder(**kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{target} built a {type(module).__name__}, not an nn.Module")
    return module


# Preset builders, by target: how a spec {"_target_": builder, "name": preset, **overrides} expands into
# the spec of the class it builds. A modality's presets module registers its builders when imported.
PRESET_BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {}


def spec_target(obj: Callable[..., Any]) -> str:
    """The `_target_` that names a class or function in a spec: "package.module.Name"."""
    return f"{obj.__module__}.{obj.__qualname__}"


def register_preset_builder(builder: Callable[..., nn.Module], expand: Callable[..., dict[str, Any]]) -> None:
    """Declare that `builder(**kw)` builds what `build_from_spec(expand(**kw))` builds."""
    PRESET_BUILDERS[spec_target(builder)] = expand


def canonical_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` as the class it builds with every argument written out, to compare nets by what they are.

    A preset builder's spec ("scm_mm_image.presets.build_unet", name "mnist-tiny") and the class spec it
    stands for ("scm_mm.nn.unet.UNet" and its keywords) become the same dict: registered builders are
    expanded, the class's defaults fill the arguments left out, and tuples become lists, as in JSON.
    """
    target = spec.get("_target_")
    builder = import_target(target)  # importing a presets module registers its builders
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    if target in PRESET_BUILDERS:
        return canonical_spec(PRESET_BUILDERS[str(target)](**kwargs))
    if inspect.isclass(builder):
        kwargs = {**_defaults(builder), **kwargs}
    return {"_target_": target, **json.loads(json.dumps(kwargs))}


def _defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of `cls(...)`, following **kwargs into the base's __init__ (VideoDiT -> DiT)."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        parameters = inspect.signature(klass).parameters.values()
        for p in parameters:
            if p.default is not p.empty:
                defaults.setdefault(p.name, p.default)  # the subclass's default wins
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return defaults


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Lines naming missing, unexpected and differently shaped tensors between two state dicts."""
    lines = [f"  missing: {k} {tuple(v.shape)}" for k, v in expected.items() if k not in found]
    lines += [f"  unexpected: {k} {tuple(v.shape)}" for k, v in found.items() if k not in expected]
    lines += [
        f"  shape of {k}: expected {tuple(v.shape)}, found {tuple(found[k].shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    return lines


def load_into(
    module: nn.Module,
    weights: Mapping[str, torch.Tensor],
    what: str,
    allow_missing: tuple[str, ...] = (),  # key substrings that may be absent (e.g. a new guidance embedding)
) -> None:
    """load_state_dict with a message that lists every difference, instead of the first one."""
    expected = module.state_dict()
    lines = [
        line
        for line in describe_mismatch(expected, weights)
        if not (line.startswith("  missing:") and any(s in line for s in allow_missing))
    ]
    if lines:
        shown = "\n".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        raise ValueError(f"{what} does not fit the model ({len(lines)} difference(s)):\n{shown}")
    module.load_state_dict(weights, strict=False)
