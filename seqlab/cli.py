"""The ``seqlab`` command: list, show, copy and run Hydra recipes; prepare data sets.

    seqlab ls                                   list the recipes with their one-line purpose
    seqlab show finetune_species [k=v ...]      print the resolved config (nothing runs)
    seqlab run finetune_species [k=v ...]       run a job; overrides use Hydra's syntax
    seqlab cp finetune_species my.yaml          copy a recipe to edit; `seqlab run ./my.yaml`
    seqlab prepare species|speech ...           build a manifest from your own or Debian's files

Recipes live in recipes/ of the source tree (or $SEQLAB_RECIPES). They are composed with
Hydra's compose API: no working-directory change, no output folder of Hydra's own, and no
resolver that executes code. Every run writes one run directory (``run_dir=...``, default
``runs/<recipe>-<time>``) holding config.yaml, metrics.jsonl, status.json, checkpoints/ and
plots/. Running again with the same ``run_dir`` resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

# OpenMP threads (torch's pool, and numba's scan through the same runtime) spin for a while
# after each parallel region by default, taking the cores from whatever runs next: the other
# pool, or another process on a shared machine. Sleeping at once instead changed one main-job
# run by under 3% and two side by side from 3.2x to 1.6x the time of one alone
# (docs/performance.md). libgomp reads this when torch loads it, so it is set before the
# first import of torch; a value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import ConfigError, SeqlabError  # noqa: E402
from . import settings  # noqa: E402

log = logging.getLogger("seqlab")

# job name (the recipe's `job:` key) -> "module:function" taking the resolved DictConfig.
JOBS = {
    "finetune_species": "seqlab.jobs.finetune_species:finetune_species",
    "pretrain_dna": "seqlab.jobs.pretrain_dna:pretrain_dna",
    "embed": "seqlab.jobs.embed:embed",
    "probe": "seqlab.jobs.probe:probe",
    "synthetic": "seqlab.jobs.synthetic:train_synthetic",
    "train_audio": "seqlab.jobs.train_audio:train_audio",
    "generate_audio": "seqlab.jobs.generate_audio:generate_audio",
}


def recipes_dir() -> Path:
    path = settings.recipes_dir()
    if not path.is_dir():
        raise ConfigError(f"recipe folder {path} not found; set SEQLAB_RECIPES to a folder of "
                          "recipes, or reinstall seqlab (its recipes ship with the package)")
    return path


def list_recipes(folder: Path | None = None) -> dict[str, str]:
    """Recipe name -> its first comment line (the purpose)."""
    folder = folder or recipes_dir()
    out = {}
    for p in sorted(folder.glob("*.yaml")):
        first = ""
        for line in p.read_text().splitlines():
            if line.startswith("#"):
                first = line.lstrip("# ").strip()
                break
        out[p.stem] = first
    return out


def _groups(*folders: Path) -> set[str]:
    """Config group names (sub-folders such as model/ and trainer/) of the recipe folders."""
    return {d.name for f in folders if f.is_dir() for d in f.iterdir() if d.is_dir()}


def _as_force_add(overrides: list[str], groups: set[str]) -> list[str]:
    """Hydra overrides with every value key written ``++key=value``.

    Hydra refuses ``key=value`` for a key the recipe lacks and then accepts ``+key=value``
    unchecked. Here both reach the schema check (seqlab.jobs.schema), which accepts the keys
    every config of a section has and names the closest valid key for any other, whatever form
    the override came in. Group choices (``model=small``) and deletions stay as they are.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(f"cannot read the override: {str(err).splitlines()[0]}") from None
    out = []
    for text, o in zip(overrides, parsed):
        if o.is_delete() or o.is_force_add() or o.key_or_group.split("@")[0] in groups:
            out.append(text)
        elif o.is_add():
            out.append("+" + text)
        else:
            out.append("++" + text)
    return out


def compose(recipe: str, overrides: list[str] | None = None, validate: bool = True):
    """Compose a recipe (a name in recipes/ or a path to a .yaml) with Hydra overrides, then
    check it against its job's schema (ConfigError names any unknown key or bad value)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        # A user's copy: compose it from its own folder, with the library's groups searchable.
        config_dir, name = path.resolve().parent, path.stem
        overrides = _as_force_add(overrides, _groups(config_dir, recipes_dir()))
        overrides = [f"hydra.searchpath=[file://{recipes_dir()}]"] + overrides
    else:
        config_dir, name = recipes_dir(), recipe
        if not (config_dir / f"{name}.yaml").exists():
            known = ", ".join(list_recipes(config_dir))
            raise ConfigError(f"no recipe named {recipe!r} in {config_dir}; known: {known}")
        overrides = _as_force_add(overrides, _groups(config_dir))
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = hydra_compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_hydra_words(err)) from None
    OmegaConf.set_struct(cfg, False)
    cfg.recipe = name
    if validate:
        from .jobs.schema import validate as check
        check(cfg)
    return cfg


def _hydra_words(err: Exception) -> str:
    """Hydra's message on one line, without its advice about '+' (keys are checked by seqlab's
    schema instead)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "append" not in ln and "Key '" not in ln] or lines
    if any(ln.startswith("Config search path") for ln in keep):
        keep = keep[:[i for i, ln in enumerate(keep) if ln.startswith("Config search path")][0]]
    return " ".join(keep).replace(" Available options in", "; available options in")


def default_run_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_job(cfg):
    """Dispatch a composed config to its job function; returns the job's summary."""
    from omegaconf import OmegaConf

    job = cfg.get("job")
    if job not in JOBS:
        raise ConfigError(f"recipe {cfg.recipe!r} has job={job!r}; known jobs: "
                          f"{', '.join(JOBS)}")
    if cfg.get("run_dir") in (None, ""):
        cfg.run_dir = str(default_run_dir(cfg))
    OmegaConf.resolve(cfg)
    module, func = JOBS[job].split(":")
    return getattr(importlib.import_module(module), func)(cfg)


def _cmd_ls(args):
    recipes = list_recipes()
    width = max(map(len, recipes)) if recipes else 0
    for name, purpose in recipes.items():
        print(f"{name:<{width}}  {purpose}")


def _cmd_show(args):
    from omegaconf import OmegaConf
    cfg = compose(args.recipe, args.overrides)
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")


def _cmd_cp(args):
    src = recipes_dir() / f"{args.recipe}.yaml"
    if not src.exists():
        raise ConfigError(f"no recipe named {args.recipe!r} in {recipes_dir()}")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise ConfigError(f"{dest} exists; not overwriting it")
    shutil.copyfile(src, dest)
    print(f"copied {src} -> {dest}; run it with: seqlab run {dest}")


def _cmd_run(args):
    from .utils import set_threads, usable_cores
    cfg = compose(args.recipe, args.overrides)
    n = set_threads(int(cfg.get("cpu_threads") or 0))
    log.debug("torch and numba use %d CPU thread(s) (%d usable core(s); cpu_threads=N sets it)",
              n, usable_cores())
    run_job(cfg)


def _cmd_status(args):
    from .training.rundir import describe_status
    for path in args.run_dirs:
        print(describe_status(path))


def _cmd_prepare(args):
    from .jobs.prepare import main as prepare_main
    prepare_main(args.what, args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqlab",
        description="Mamba models for genomes and raw audio. Jobs are Hydra recipes: "
                    "`seqlab ls` lists them, `seqlab show NAME` prints one resolved, "
                    "`seqlab run NAME key=value ...` runs it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  seqlab run finetune_species                 # the main job, bundled genomes, CPU\n"
               "  seqlab run finetune_species trainer.max_steps=50 run_dir=runs/quick\n"
               "  seqlab run finetune_species run_dir=runs/quick   # resume a killed run\n"
               "  seqlab show train_audio model.n_layer=8     # inspect before running\n"
               "  seqlab prepare species --help\n")
    p.add_argument("-v", "--verbose", "--debug", action="store_true", dest="debug",
                   help="debug logging (shows which scan implementation runs) and the full "
                        "traceback of any error")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    s = sub.add_parser("ls", help="list recipes")
    s.set_defaults(fn=_cmd_ls)
    for name, fn, helptext in (("run", _cmd_run, "run a recipe"),
                               ("show", _cmd_show, "print a recipe's resolved config")):
        s = sub.add_parser(name, help=helptext,
                           description=f"{helptext}. RECIPE is a name from `seqlab ls` or a "
                                       "path to a .yaml; OVERRIDES are Hydra overrides "
                                       "such as trainer.max_steps=100 model=bidir_small.")
        s.add_argument("recipe", metavar="RECIPE")
        s.add_argument("overrides", nargs="*", metavar="OVERRIDES")
        s.set_defaults(fn=fn)
    s = sub.add_parser("status", help="say what state run directories are in",
                       description="Print one line per run directory: running (with its step and "
                                   "last heartbeat), completed, failed (with the error), or "
                                   "interrupted (its process stopped without finishing).")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    s.set_defaults(fn=_cmd_status)
    s = sub.add_parser("cp", help="copy a recipe to edit")
    s.add_argument("recipe")
    s.add_argument("dest")
    s.set_defaults(fn=_cmd_cp)
    s = sub.add_parser("prepare", help="build a data set manifest (species | speech)",
                       add_help=False)
    s.add_argument("what", choices=["species", "speech"])
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_cmd_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args.fn(args)
    except Exception as exc:
        if args.debug:
            raise
        return _report(exc)
    except KeyboardInterrupt:
        print("seqlab: interrupted", file=sys.stderr)
        return 130
    return 0


def _terminate(signum, frame):
    # A job killed by SIGTERM (a scheduler's time limit, `kill`) records its status as
    # "interrupted" on the way out, as Ctrl-C does.
    raise KeyboardInterrupt("terminated (SIGTERM)")


# Errors of the user's making, and how the command ends for them; anything else is a bug in
# seqlab and keeps its traceback.
_SHORT = (SeqlabError, ValueError, KeyError, OSError)


def _report(exc: Exception) -> int:
    """Print a user's error in a few lines (no traceback) and return the exit code."""
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        msg = (f"out of memory on the device ({str(exc).splitlines()[0]}); lower the batch size "
               "(trainer.micro_batch_size, with trainer.grad_accum to keep the global batch) "
               "or the model size")
    elif isinstance(exc, _SHORT):
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
            msg = f"{exc.filename}: {exc.strerror or msg}"
    else:
        raise exc
    print(f"seqlab: error: {msg}", file=sys.stderr)
    print("(run with --debug for the traceback)", file=sys.stderr)
    return getattr(exc, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
