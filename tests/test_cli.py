"""The command line: every key checked, user errors in a few lines with the right exit code."""
import json
import os
import subprocess
import sys

import pytest
import torch

from seqlab.cli import _as_force_add, compose, main
from seqlab.errors import ConfigError
from seqlab.jobs.schema import JOB_SCHEMAS, validate
from seqlab.training.rundir import RunDir
from seqlab.training.trainer import TrainerConfig


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _short(err: str):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert 1 <= len(lines) <= 4, err
    return lines


@pytest.mark.parametrize("override", ["data.windw=100", "+data.windw=100", "++data.windw=100"])
def test_typo_key_is_refused_in_every_form_with_the_closest_key(capsys, override):
    code, _, err = _run(capsys, "run", "finetune_species", override)
    assert code == 2
    line = _short(err)[0]
    assert "unknown key data.windw" in line and "did you mean data.window?" in line


@pytest.mark.parametrize("recipe, override, closest", [
    ("finetune_species", "head.poolng=max", "head.pooling"),
    ("finetune_species", "post.embed_prob=false", "post.embed_probe"),
    ("finetune_species", "eval_batchsize=8", "eval_batch_size"),
    ("train_audio", "sample.secnds=1", "sample.seconds"),
    ("synthetic_induction", "eval.extrapolat=[2]", "eval.extrapolate"),
    ("finetune_species", "trainer.max_step=5", "trainer.max_steps"),
    ("finetune_species", "model.d_modl=32", "model.d_model"),
])
def test_every_section_is_checked(recipe, override, closest):
    with pytest.raises(ConfigError, match=f"did you mean {closest}"):
        compose(recipe, [override])


def test_every_recipe_fits_its_schema():
    from seqlab.cli import list_recipes
    mandatory = {"embed": ["checkpoint=x"], "generate_audio": ["checkpoint=x"],
                 "probe": ["embeddings=x.npz"]}
    for recipe in list_recipes():
        cfg = compose(recipe, mandatory.get(recipe, []))
        assert cfg.job in JOB_SCHEMAS
        validate(cfg)


def test_trainer_groups_share_one_schema():
    """cpu.yaml and gpu.yaml hold the same keys (TrainerConfig's), so an override that works with
    one works with the other."""
    import yaml
    from seqlab.cli import recipes_dir
    fields = set(TrainerConfig.__dataclass_fields__)
    for name in ("cpu", "gpu"):
        keys = set(yaml.safe_load((recipes_dir() / "trainer" / f"{name}.yaml").read_text()))
        assert keys == fields, (name, keys ^ fields)
    cfg = compose("finetune_species", ["trainer=gpu", "trainer.max_minutes=2"])
    assert cfg.trainer.max_minutes == 2 and cfg.trainer.profile == "gpu"


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="data.window"):
        compose("finetune_species", ["data.window=abc"])
    with pytest.raises(ConfigError, match="model:.*norm"):
        compose("finetune_species", ["model.norm=batch"])


def test_group_choices_and_deletions_keep_their_form():
    groups = {"model", "trainer"}
    assert _as_force_add(["model=small", "data.window=5", "+x=1", "~data.fasta", "++y=2"],
                         groups) == ["model=small", "++data.window=5", "++x=1", "~data.fasta",
                                     "++y=2"]


def test_missing_mandatory_value_is_one_line(capsys):
    code, _, err = _run(capsys, "run", "embed")
    assert code == 2
    assert "checkpoint is required: add checkpoint=" in _short(err)[0]


def test_missing_input_file_is_short(capsys, tmp_path):
    code, _, err = _run(capsys, "run", "pretrain_dna", "data.manifest=null",
                        f"data.fasta=[{tmp_path}/absent.fa]", f"run_dir={tmp_path}/run")
    assert code == 2
    assert "absent.fa" in _short(err)[0]
    assert not (tmp_path / "run").exists(), "a start that fails leaves no run directory"


def test_empty_fasta_is_short(capsys, tmp_path):
    (tmp_path / "empty.fa").write_text("")
    code, _, err = _run(capsys, "run", "pretrain_dna", "data.manifest=null",
                        f"data.fasta=[{tmp_path}/empty.fa]", f"run_dir={tmp_path}/run")
    assert code == 1
    assert "empty.fa" in _short(err)[0] and "empty" in err


def test_debug_shows_the_traceback(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "seqlab.cli", "--debug", "run", "pretrain_dna",
                        "data.manifest=null", f"data.fasta=[{tmp_path}/absent.fa]",
                        f"run_dir={tmp_path}/run"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr and "absent.fa" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_profile_without_a_gpu_says_so(caplog):
    from seqlab.utils import resolve_device
    with caplog.at_level("WARNING", logger="seqlab"):
        assert resolve_device("auto", profile="gpu").type == "cpu"
    assert "no CUDA device" in caplog.text
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda", profile="gpu")


def test_second_run_on_a_held_directory_exits_at_once(capsys, tmp_path):
    run = RunDir(tmp_path / "run").acquire()
    try:
        code, _, err = _run(capsys, "run", "finetune_species", "trainer.max_steps=1",
                            f"run_dir={tmp_path}/run")
    finally:
        run.release()
    assert code == 1
    line = _short(err)[0]
    assert str(tmp_path / "run") in line and f"pid {os.getpid()}" in line


def test_status_command(capsys, tmp_path):
    run = RunDir(tmp_path / "r").acquire()
    run.begin("a: 1\n", step=0)
    run.heartbeat(5, force=True)
    run.complete(step=9)
    run.release()
    code, out, _ = _run(capsys, "status", str(tmp_path / "r"), str(tmp_path / "none"))
    assert code == 0
    assert "completed at step 9" in out and "no run here yet" in out
    assert json.loads((tmp_path / "r" / "status.json").read_text())["status"] == "completed"


TRAINING_RECIPES = ["finetune_species", "pretrain_dna", "synthetic_induction",
                    "synthetic_selective_copy", "synthetic_selective_copy_fast", "train_audio"]


@pytest.mark.parametrize("recipe", TRAINING_RECIPES)
def test_trainer_group_choice_is_never_overridden_by_the_recipe(recipe):
    """trainer=gpu gives the recipe's GPU profile: every trainer key is the profile's value where
    the profile sets it, else the gpu group's, never the CPU settings of the recipe."""
    import yaml
    from seqlab.cli import recipes_dir
    group = yaml.safe_load((recipes_dir() / "trainer" / "gpu.yaml").read_text())
    profile = yaml.safe_load((recipes_dir() / "profile" / recipe / "gpu.yaml").read_text()) or {}
    cfg = compose(recipe, ["trainer=gpu"])
    for key, value in group.items():
        assert cfg.trainer[key] == profile.get("trainer", {}).get(key, value), key
    cpu = compose(recipe, [])
    assert cpu.trainer.profile == "cpu" and cfg.trainer.profile == "gpu"
    # A choice made on the command line wins over the profile, for keys and groups alike.
    mine = compose(recipe, ["trainer=gpu", "trainer.max_steps=7", "model=small"])
    assert mine.trainer.max_steps == 7 and mine.model.d_model == 64 and mine.model.n_layer == 2


def test_finetune_species_gpu_profile_is_gpu_sized():
    cpu, gpu = compose("finetune_species", []), compose("finetune_species", ["trainer=gpu"])
    assert (cpu.model.d_model, cpu.model.n_layer, cpu.trainer.max_steps) == (64, 2, 250)
    assert (gpu.model.d_model, gpu.model.n_layer, gpu.trainer.max_steps) == (128, 4, 1500)
    assert gpu.trainer.micro_batch_size == 32 and gpu.head.conjoin_rc is True
