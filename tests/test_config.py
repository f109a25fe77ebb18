"""The typed config: defaults are the paper's recipe, precedence, and errors that name the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from densenet.training.config import (RECIPES, Config, ConfigError, config_changes, config_from_dict, config_to_dict,
                             load_yaml, parse_config, save_config)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_recipe():
    cfg = parse_config(["--data", "demo"])
    assert (cfg.optimizer, cfg.momentum, cfg.nesterov) == ("sgd", 0.9, True)
    assert (cfg.base_lr, cfg.weight_decay, cfg.epochs) == (0.1, 1e-4, 90)
    assert (cfg.lr_schedule, cfg.lr_milestones, cfg.lr_gamma) == ("step", [30, 60], 0.1)
    assert cfg.batch_size * 8 == 256  # per process, the paper's total on 8 GPUs
    assert not cfg.ema and cfg.mixup == 0 and cfg.label_smoothing == 0


def test_precedence_recipe_then_file_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: modern\nlabel_smoothing: 0.2\nepochs: 7\nbatch-size: 16\n")
    cfg = parse_config(["--data", "demo", "--config", str(f), "--epochs", "3"])
    assert cfg.recipe == "modern"
    assert cfg.lr_schedule == "cosine" and cfg.ema  # from the recipe
    assert cfg.label_smoothing == 0.2 and cfg.batch_size == 16  # the file beats the recipe
    assert cfg.epochs == 3  # the flag beats the file
    assert parse_config(["--data", "demo", "--recipe", "modern"]).epochs == RECIPES["modern"]["epochs"]


def test_cli_types_and_booleans():
    cfg = parse_config(["--data", "demo", "--no-nesterov", "--channels-last", "--max-steps", "5",
                        "--lr-milestones", "2", "4", "--wandb-tags", "a", "b", "--grad-clip", "1.5", "--no-resume"])
    assert cfg.nesterov is False and cfg.channels_last is True
    assert cfg.max_steps == 5 and cfg.lr_milestones == [2, 4] and cfg.wandb_tags == ["a", "b"]
    assert cfg.grad_clip == 1.5 and cfg.resume == "never"
    assert parse_config(["--data", "demo", "--max-steps", "none"]).max_steps is None


@pytest.mark.parametrize("text, words", [
    ("lr_sched: cosine\n", ["unknown key 'lr_sched'", "lr_schedule"]),
    ("epochs: ten\n", ["epochs", "integer", "'ten'"]),
    ("nesterov: 1\n", ["nesterov", "true or false"]),
    ("batch_size: 2.5\n", ["batch_size", "integer"]),
    ("lr_milestones: [30, x]\n", ["lr_milestones", "list of an integer"]),
    ("amp: fp8\n", ["amp", "'fp8'", "bf16"]),
    ("epochs: 0\n", ["epochs must be positive"]),
    ("- 1\n- 2\n", ["mapping"]),
    ("label_smoothing: 1.5\n", ["label_smoothing", "[0, 1)"]),
    ("aug_repeats: 0\n", ["aug_repeats must be at least 1", "got 0"]),
    ("recipe: fancy\n", ["recipe", "fancy", "paper"]),
])
def test_bad_file_values_name_the_key(tmp_path, text, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--data", "demo", "--config", str(f)])
    for word in words:
        assert word in str(e.value)


def test_bad_combinations():
    with pytest.raises(ConfigError, match="data: no data given"):
        parse_config([])
    with pytest.raises(ConfigError, match="--evaluate needs --weights"):
        parse_config(["--data", "demo", "--evaluate"])
    with pytest.raises(ConfigError, match="even with mixup"):
        parse_config(["--data", "demo", "--mixup", "0.2", "--batch-size", "7"])
    with pytest.raises(ConfigError, match="config: file not found"):
        parse_config(["--data", "demo", "--config", "/nonexistent.yaml"])


def test_bad_flag_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="--batch-size.*invalid int value: 'many'"):
        parse_config(["--data", "demo", "--batch-size", "many"])


def test_no_prefix_matching_and_typos_get_the_closest_flag():
    with pytest.raises(ConfigError, match=r"unknown flag --output-di; did you mean --output-dir\?"):
        parse_config(["--data", "demo", "--output-di", "x"])
    with pytest.raises(ConfigError, match="unknown flag --epoch; did you mean --epochs"):
        parse_config(["--data", "demo", "--epoch", "3"])
    with pytest.raises(ConfigError, match="unexpected argument 'extra'"):
        parse_config(["--data", "demo", "extra"])


def test_torchvision_and_timm_spellings_are_aliases():
    cfg = parse_config(["--data-path", "demo", "--model", "densenet169", "-b", "16", "-j", "3", "--opt", "adamw",
                        "--wd", "0.05", "--print-freq", "7", "--output", "runs/x", "--model-ema", "--reprob", "0.2",
                        "--smoothing", "0.1", "--clip-grad", "1.0", "--lr-warmup-epochs", "2"])
    assert (cfg.data, cfg.arch, cfg.batch_size, cfg.workers, cfg.optimizer) == ("demo", "densenet169", 16, 3, "adamw")
    assert (cfg.weight_decay, cfg.log_every, cfg.output_dir, cfg.ema) == (0.05, 7, "runs/x", True)
    assert (cfg.random_erasing, cfg.label_smoothing, cfg.grad_clip, cfg.warmup_epochs) == (0.2, 0.1, 1.0, 2.0)
    assert parse_config(["--data-dir", "demo", "--test-only", "--weights", "w.pt"]).evaluate
    assert cfg.given("arch") and not cfg.given("image_size")


def test_unknown_arch_lists_the_models():
    with pytest.raises(ConfigError, match=r"unknown model 'densenet12' \(did you mean densenet121\?\); choose one "
                                          r"of densenet121, densenet161"):
        parse_config(["--data", "demo", "--arch", "densenet12"])


def test_image_too_small_for_the_model():
    with pytest.raises(ConfigError, match="image_size: 28 px is too small for densenet121.*at least 29 px"):
        parse_config(["--data", "demo", "--image-size", "28"])
    assert parse_config(["--data", "demo", "--image-size", "29"]).image_size == 29


def test_auto_augment_needs_cpu_decode():
    with pytest.raises(ConfigError, match="auto_augment.*--decode device"):
        parse_config(["--data", "demo", "--decode", "device", "--auto-augment", "rand-m9-mstd0.5"])


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(["--data", "demo", "--recipe", "modern", "--max-steps", "9", "--wandb-tags", "x"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path, {"world_size": 2, "peak_lr": 0.05})
    text = path.read_text()
    assert "# world_size: 2" in text
    assert parse_config(["--config", str(path)]) == cfg
    assert config_from_dict(yaml.safe_load(text)) == cfg
    assert load_yaml(str(path))["max_steps"] == 9


def test_config_changes_lists_differences():
    old = config_to_dict(parse_config(["--data", "demo"]))
    new = parse_config(["--data", "demo", "--epochs", "5"])
    assert config_changes(old, new) == ["epochs: 90 -> 5"]
    assert isinstance(Config().run_dir(), Path)


def test_train_dist_reports_config_errors_with_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "train_dist.py", "--data", "demo", "--epochs", "-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: epochs must be positive, got -1" in proc.stderr
