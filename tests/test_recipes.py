"""The built-in recipes for many GPUs (docs/training.md, recipes): LAMB and LARS from timm with their
lr scaling rules and warmup, progressive resizing (the crop schedule, the three readers, one compiled
graph per size) and each recipe resumed bitwise across its warmup's end and its size change."""
from __future__ import annotations

import math
import re
import signal

import pytest

from _train_util import TINY, Background, assert_same_training_state, compiled_graphs, demo_root, load, run
from densenet.training.config import ConfigError, eval_crop_size, parse_config, train_sizes_of
from densenet.training.optim import build_optimizer, peak_lr
from densenet.training.resolution import image_pixels, train_sizes


# --- optimizers and their lr rules --------------------------------------------------------------

@pytest.mark.parametrize("optimizer, rule", [("sgd", "linear"), ("lars", "linear"), ("adamw", "sqrt"),
                                             ("lamb", "sqrt")])
def test_peak_lr_follows_the_optimizers_scaling_rule(optimizer, rule):
    cfg = parse_config(["--data", "demo", "--optimizer", optimizer, "--base-lr", "0.1"])
    expected = 0.1 * (4096 / 256 if rule == "linear" else math.sqrt(4096 / 256))
    assert peak_lr(cfg, 4096) == pytest.approx(expected)
    forced = parse_config(["--data", "demo", "--optimizer", optimizer, "--base-lr", "0.1", "--lr-base-scale", "linear"])
    assert peak_lr(forced, 4096) == pytest.approx(0.1 * 16)


def test_lamb_and_lars_come_from_timm_with_warmup_and_no_decay_on_norms_and_biases():
    import timm.optim

    from densenet import create_model

    model = create_model("densenet_tiny", num_classes=10)
    for name, cls in (("lamb", timm.optim.Lamb), ("lars", timm.optim.Lars)):
        cfg = parse_config(["--data", "demo", "--optimizer", name])
        assert cfg.warmup_epochs == 5.0 and not cfg.weight_decay_norm_bias
        opt = build_optimizer(model, cfg, lr=0.01)
        assert type(opt) is cls
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == cfg.weight_decay > 0 and no_decay["weight_decay"] == 0.0
        assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    assert parse_config(["--data", "demo", "--optimizer", "lars"]).base_lr == 0.3  # SimCLR's, per 256
    # a recipe, a file or a flag wins over what the optimizer brings
    assert parse_config(["--data", "demo", "--optimizer", "lamb", "--warmup-epochs", "1"]).warmup_epochs == 1.0


def test_large_batch_recipe_is_lamb_at_the_square_root_rule():
    cfg = parse_config(["--data", "demo", "--recipe", "large-batch"])
    assert (cfg.optimizer, cfg.lr_schedule, cfg.warmup_epochs, cfg.weight_decay) == ("lamb", "cosine", 5.0, 0.02)
    assert peak_lr(cfg, 2048) == pytest.approx(8e-3)  # ResNet strikes back A3: 8e-3 at 2,048 images
    assert peak_lr(cfg, 32768) == pytest.approx(8e-3 * 4)


# --- progressive resizing -------------------------------------------------------------------------

def test_train_sizes_follow_ffcvs_ramp():
    sizes = train_sizes(224, 40, 160 / 224, [0.74, 0.86], 32)
    assert sizes[:30] == (160,) * 30 and sizes[-6:] == (224,) * 6
    assert set(sizes[30:34]) <= {160, 192, 224} and list(sizes) == sorted(sizes)
    assert train_sizes(224, 3, None, [0.74, 0.86], 32) == (224, 224, 224)
    assert image_pixels((32, 64), 10) == 10 * (32 * 32 + 64 * 64)


def test_fast_recipe_trains_small_then_full_size_and_evaluates_where_asked():
    cfg = parse_config(["--data", "demo", "--recipe", "fast"])
    sizes = train_sizes_of(cfg)
    assert len(sizes) == cfg.epochs == 40 and sizes[0] == 160 and sizes[-1] == 224
    assert eval_crop_size(cfg) == 224
    assert eval_crop_size(parse_config(["--data", "demo", "--image-size", "192", "--eval-image-size", "224"])) == 224


@pytest.mark.parametrize("args, says", [
    (["--train-size-start", "1.5"], "train_size_start must be a fraction"),
    (["--train-size-start", "0.9", "--image-size", "64"], "--train-size-multiple"),
    (["--train-size-start", "0.95", "--image-size", "64", "--train-size-multiple", "8"],
     "never change; use a smaller --train-size-start or a larger --image-size"),
    (["--train-size-start", "0.3", "--image-size", "64", "--arch", "densenet_tiny", "--train-size-multiple", "8"],
     "too small"),
    (["--train-size-ramp", "0.8", "0.2"], "train_size_ramp"),
    (["--eval-image-size", "8", "--arch", "densenet_tiny"], "eval_image_size"),
])
def test_bad_resizing_settings_are_refused_in_one_line(args, says):
    with pytest.raises(ConfigError, match=says) as err:
        parse_config(["--data", "demo", *args])
    assert "\n" not in str(err.value)


def _batch_sizes(loader, epochs):
    shapes = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        images, _, _ = next(iter(loader))
        shapes.append(tuple(images.shape[-2:]))
    return shapes


@pytest.mark.parametrize("reader", ["folders", "shards", "device-decode"])
def test_every_reader_changes_the_size_at_the_epoch_boundary(tmp_path, reader):
    from data import TrainTransform, build_train_loader

    root = demo_root(tmp_path)
    data = root
    if reader == "shards":
        from data.shards import convert

        data = tmp_path / "shards"
        convert(root, "train", data, samples_per_shard=100, show_progress=False)
    transform = TrainTransform(48, sizes_by_epoch=(32, 40, 48))
    loader = build_train_loader(data, transform, batch_size=8, workers=1, seed=0,
                                decode_on="cpu" if reader == "device-decode" else None)
    assert _batch_sizes(loader, 4) == [(32, 32), (40, 40), (48, 48), (48, 48)]
    assert [loader.size_at(e) for e in range(4)] == [32, 40, 48, 48]


# --- each recipe end to end: 2 processes, stopped and resumed, bitwise equal to one go ----------

# 500 demo images, 2 x 25 per step: 10 steps per epoch. The fast recipe's warmup (2 epochs) ends at
# step 20, where its crop grows from 32 to 48 px (epoch 3 of 4, --train-size-ramp 0.25 0.5); LAMB's
# and LARS's warmup (given as 2 epochs, to keep the run short) ends there too.
RECIPE_ARGS = {
    "fast": ["--recipe", "fast", "--image-size", "48", "--train-size-multiple", "16", "--train-size-ramp", "0.25",
             "0.5", "--eval-image-size", "56"],
    "large-batch": ["--recipe", "large-batch", "--warmup-epochs", "2"],
    "lars": ["--optimizer", "lars", "--warmup-epochs", "2", "--lr-schedule", "cosine"],
}
COMMON = [a for a in TINY if a not in ("--image-size", "32")] + [
    "--deterministic", "--batch-size", "25", "--epochs", "4", "--ckpt-every", "0", "--log-every", "5"]


def _stop_by_signal(args, log, after_step):
    """Train in the background and SIGTERM the process group once step ``after_step`` is logged: a
    stop mid-epoch that, unlike --max-steps, does not evaluate (an evaluation averages the BatchNorm
    statistics over the ranks, which the uninterrupted run does only at epoch ends)."""
    job = Background(args + ["--log-every", "1"], log, nproc=2)
    job.wait_for(rf"\(global {after_step}\)")
    job.kill_group(signal.SIGTERM)
    job.finish()
    assert "stopped by a signal" in job.output(), job.output()
    return job.output()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fast", "large-batch", "lars"])
def test_recipe_resumes_bitwise_across_warmup_end_and_size_change(tmp_path, recipe):
    data = demo_root(tmp_path / "data")
    args = COMMON + (["--image-size", "32"] if recipe != "fast" else []) + RECIPE_ARGS[recipe] + ["--data", str(data)]
    final = 32
    one_go = run(args + ["--output-dir", str(tmp_path / "one"), "--max-steps", str(final)], nproc=2)
    assert one_go.returncode == 0, one_go.stdout
    if recipe == "fast":
        assert "epoch 1/4: training at 32 px (evaluating at 56 px)" in one_go.stdout, one_go.stdout
        assert "epoch 3/4: training at 48 px (evaluating at 56 px)" in one_go.stdout, one_go.stdout
    expected_optimizer = {"fast": "sgd", "large-batch": "lamb", "lars": "lars"}[recipe]
    assert f"global; {expected_optimizer}, peak lr" in one_go.stdout

    stopped = tmp_path / "stopped"
    at = args + ["--output-dir", str(stopped)]
    _stop_by_signal(at + ["--max-steps", str(final)], tmp_path / "before.log", 13)  # in warmup, at 32 px
    before = load(stopped / "last.pt")["progress"]["global_step"]
    assert 13 <= before < 20, before
    if recipe == "fast":  # stopped at the epoch end where warmup ends and the size changes
        edge = run(at + ["--max-steps", "20"], nproc=2)
        assert edge.returncode == 0 and "resumed from" in edge.stdout, edge.stdout
        assert load(stopped / "last.pt")["progress"]["global_step"] == 20
        # and mid-epoch after both: the resumed run goes on at the new size
        said = _stop_by_signal(at + ["--max-steps", str(final)], tmp_path / "after.log", 23)
        assert "resumed from" in said and "epoch 3/4: training at 48 px" in said, said
        after = load(stopped / "last.pt")["progress"]["global_step"]
        assert 23 <= after < final, after
    rest = run(at + ["--max-steps", str(final)], nproc=2)
    assert rest.returncode == 0 and "resumed from" in rest.stdout, rest.stdout
    if recipe == "fast":  # resumed after the change: at the new size from its first step
        assert "epoch 3/4: training at 48 px" in rest.stdout, rest.stdout
    assert_same_training_state(tmp_path / "one" / "last.pt", stopped / "last.pt")
    stops = f"{before}, 20 and {after}" if recipe == "fast" else f"{before} (in warmup)"
    print(f"\n{recipe}: stopped at step {stops}, resumed each time, bitwise equal to one go at step {final}")


@pytest.mark.slow
def test_compile_makes_one_graph_per_training_size_also_after_a_resume(tmp_path):
    """Sizes 32, 40, 48 (epochs 1-2, 3, 4 of 4; 10 steps each): three graphs, static each; a run
    resumed in epoch 4 compiles only its own size."""
    data = demo_root(tmp_path / "data")
    args = COMMON + ["--batch-size", "50", "--image-size", "48", "--train-size-start", "0.67", "--train-size-multiple", "8",
                     "--train-size-ramp", "0.25", "0.75", "--compile", "--compile-backend", "counting",
                     "--data", str(data), "--output-dir", str(tmp_path / "run")]
    count, sizes, log = compiled_graphs(args + ["--max-steps", "35"])
    assert re.findall(r"training at (\d+) px", log) == ["32", "40", "48"], log
    assert (count, sizes) == (3, [32, 40, 48]), log
    count, sizes, log = compiled_graphs(args)
    assert "resumed from" in log and (count, sizes) == (1, [48]), log


def test_a_resume_keeps_the_peak_lr_an_older_checkpoint_scaled_linearly(capsys):
    """AdamW used to scale linearly; now the square root. A checkpoint written before lr_scaling
    existed keeps its peak lr on resume instead of changing it mid-run, and says so."""
    import torch as _torch

    import train_dist
    from densenet.training.checkpoint import Progress, Resumed
    from densenet.training.distributed import DistInfo

    cfg = parse_config(["--data", "demo", "--optimizer", "adamw", "--base-lr", "0.001"])
    old = {k: v for k, v in cfg.__dict__.items() if k not in ("lr_scaling", "_given")}
    progress = Progress(world_size=8, batch_size=128).to_dict()
    resumed = Resumed(path=None, state={"config": old, "progress": progress})
    info = DistInfo(0, 1, 0, _torch.device("cpu"), None, "single")
    kept = train_dist.keep_checkpoint_lr(cfg, resumed, 1024, info)
    assert kept.lr == pytest.approx(0.001 * 1024 / 256)  # linear, as the checkpoint's run had it
    assert "peak lr came from the linear scaling rule" in capsys.readouterr().out
    # the same config written with the rule recorded: nothing to keep
    resumed.state["config"]["lr_scaling"] = "auto"
    assert train_dist.keep_checkpoint_lr(cfg, resumed, 1024, info).lr is None
