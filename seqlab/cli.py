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
import sys
import time
from pathlib import Path

from .utils import repo_root

log = logging.getLogger("seqlab")

# job name (the recipe's `job:` key) -> "module:function" taking the resolved DictConfig.
JOBS = {
    "finetune_species": "seqlab.jobs.species:finetune_species",
    "pretrain_dna": "seqlab.jobs.species:pretrain_dna",
    "embed": "seqlab.jobs.embed:embed",
    "probe": "seqlab.jobs.embed:probe",
    "synthetic": "seqlab.jobs.synthetic:train_synthetic",
    "train_audio": "seqlab.jobs.audio:train_audio",
    "generate_audio": "seqlab.jobs.audio:generate_audio",
}


def recipes_dir() -> Path:
    env = os.environ.get("SEQLAB_RECIPES")
    path = Path(env) if env else repo_root() / "recipes"
    if not path.is_dir():
        raise SystemExit(f"seqlab: recipe folder {path} not found; set SEQLAB_RECIPES to the "
                         "recipes/ folder of a seqlab checkout")
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


def compose(recipe: str, overrides: list[str] | None = None):
    """Compose a recipe (a name in recipes/ or a path to a .yaml) with Hydra overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        # A user's copy: compose it from its own folder, with the library's groups searchable.
        config_dir, name = path.resolve().parent, path.stem
        overrides = [f"hydra.searchpath=[file://{recipes_dir()}]"] + overrides
    else:
        config_dir, name = recipes_dir(), recipe
        if not (config_dir / f"{name}.yaml").exists():
            known = ", ".join(list_recipes(config_dir))
            raise SystemExit(f"seqlab: no recipe named {recipe!r} in {config_dir}; known: {known}")
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = hydra_compose(config_name=name, overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.recipe = name
    return cfg


def default_run_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_job(cfg):
    """Dispatch a composed config to its job function; returns the job's summary."""
    from omegaconf import OmegaConf

    job = cfg.get("job")
    if job not in JOBS:
        raise SystemExit(f"seqlab: recipe {cfg.recipe!r} has job={job!r}; known jobs: "
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
        raise SystemExit(f"seqlab: no recipe named {args.recipe!r} in {recipes_dir()}")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise SystemExit(f"seqlab: {dest} exists; not overwriting it")
    shutil.copyfile(src, dest)
    print(f"copied {src} -> {dest}; run it with: seqlab run {dest}")


def _cmd_run(args):
    cfg = compose(args.recipe, args.overrides)
    run_job(cfg)


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
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows which "
                   "scan implementation runs)")
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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
