"""The GPU fast path, as far as the CPU can check it: its switches, the optimizer kernels, the backend
flags it sets for CUDA, and torch.compile compiling the training model once per process, across
epochs, evaluations and a resume."""
from __future__ import annotations

import ast
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from _train_util import REPO, TINY, compiled_graphs, demo_root, env
from densenet.training.config import ConfigError, parse_config
from densenet.training.distributed import DistInfo
from densenet.training.engine import compile_model
from densenet.training.settings import configure_backends
from densenet.training.optim import build_optimizer, kernels_in_use, optimizer_kernels


def test_fast_path_is_on_by_default_and_each_part_switches_off():
    cfg = parse_config(["--data", "demo"])
    assert (cfg.cudnn_benchmark, cfg.tf32, cfg.pin_memory, cfg.optimizer_impl) == (True, True, True, "auto")
    assert (cfg.amp, cfg.channels_last, cfg.compile) == ("auto", None, False)  # bf16 and NHWC on CUDA, see engine
    off = parse_config(["--data", "demo", "--no-cudnn-benchmark", "--no-tf32", "--no-pin-memory", "--amp", "off",
                        "--no-channels-last", "--optimizer-impl", "loop"])
    assert (off.cudnn_benchmark, off.tf32, off.pin_memory, off.amp, off.channels_last, off.optimizer_impl) == (
        False, False, False, "off", False, "loop")
    with pytest.raises(ConfigError, match="compile_backend"):
        parse_config(["--data", "demo", "--compile-backend", " "])
    with pytest.raises(ConfigError, match="unknown torch.compile backend 'nope'"):
        compile_model(torch.nn.Linear(2, 2), "nope")


def test_backend_flags_for_cuda_follow_the_config():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    cuda = torch.device("cuda")  # the flags are plain settings; setting them needs no GPU
    try:
        configure_backends(parse_config(["--data", "demo"]), cuda)
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
        configure_backends(parse_config(["--data", "demo", "--no-cudnn-benchmark", "--no-tf32"]), cuda)
        assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        configure_backends(parse_config(["--data", "demo", "--deterministic"]), cuda)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved


def test_optimizer_kernels_differ_in_speed_only():
    assert optimizer_kernels("auto", "cuda") == {"fused": True} and optimizer_kernels("auto", "cpu") == {}
    torch.manual_seed(0)
    # No bias before the BatchNorm: its gradient is rounding noise, which Adam would scale up to full steps.
    start = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(128, 4))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    results = {}
    for optimizer in ("sgd", "adamw"):
        for impl in ("loop", "foreach", "fused"):
            model = copy.deepcopy(start)
            cfg = parse_config(["--data", "demo", "--optimizer", optimizer, "--optimizer-impl", impl,
                                "--no-weight-decay-norm-bias"])
            opt = build_optimizer(model, cfg, lr=0.05)
            assert kernels_in_use(opt) == impl
            for _ in range(3):
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            results[optimizer, impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert not torch.equal(results[optimizer, "loop"], torch.cat([p.flatten() for p in start.parameters()]))
        for impl in ("foreach", "fused"):
            torch.testing.assert_close(results[optimizer, impl], results[optimizer, "loop"], rtol=1e-5, atol=1e-6)


def test_pinned_batches_only_for_cuda():
    from densenet.training.settings import resolve_settings

    cpu = DistInfo(0, 1, 0, torch.device("cpu"), None, "single")
    cuda = DistInfo(0, 1, 0, torch.device("cuda", 0), None, "single")
    pinned = lambda flags, info: resolve_settings(parse_config(["--data", "demo", "--amp", "off", *flags]),  # noqa: E731
                                                  info).pin_memory
    assert not pinned([], cpu) and pinned([], cuda)
    assert not pinned(["--no-pin-memory"], cuda)


FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from densenet.training.config import parse_config
    from densenet.training.settings import configure_backends
    configure_backends(parse_config(["--data", "demo", *sys.argv[1:]]), torch.device("cpu"))
    faults = []
    for _ in range(10):  # a training step's pattern in miniature: activations of several sizes, all freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        # all above 32 MiB, the most glibc's adaptive threshold ever serves from its heap
        activations = [torch.empty(mib * 2**18).fill_(1.0) for mib in (40, 100, 60, 150)]
        del activations
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(faults)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's")
def test_cpu_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    def faults(*flags):
        proc = subprocess.run([sys.executable, "-c", FAULTS, *flags], cwd=REPO, env=env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return ast.literal_eval(proc.stdout.strip().splitlines()[-1])

    pages = 350 * 2**20 // 4096  # what one pass touches
    kept, returned = faults(), faults("--no-cpu-keep-memory")
    assert all(n > pages // 2 for n in returned[-3:]), returned  # glibc's default: every pass faults again
    assert sum(kept[-3:]) < pages // 100, kept  # kept: after a few passes the heap is reused as it is


@pytest.mark.slow
def test_compile_happens_once_across_epochs_evaluation_and_resume(tmp_path):
    data = demo_root(tmp_path)
    out = tmp_path / "run"
    args = TINY + ["--data", str(data), "--output-dir", str(out), "--batch-size", "50", "--epochs", "3",
                   "--compile", "--compile-backend", "counting", "--log-every", "5", "--ckpt-every", "0"]

    # 10 steps per epoch: epoch 1, its evaluation, then stop 5 steps into epoch 2 (and evaluate again)
    count, shapes, log = compiled_graphs(args + ["--max-steps", "15"])
    assert "compile counting" in log and "epoch 1/3 done" in log and "epoch 2/3 stopped" in log
    assert count == 1, f"expected one training graph, got {count}: {shapes}"
    # resume in the middle of epoch 2 and finish epoch 3: one graph again, compiled for the new process
    count, shapes, log = compiled_graphs(args)
    assert "resumed from" in log and "epoch 3/3 done" in log
    assert count == 1, f"expected one training graph after the resume, got {count}: {shapes}"


@pytest.mark.slow
def test_device_decode_trains_and_resumes_exactly(tmp_path):
    """--decode device (here the CPU is the device): the workers only read files and draw the crops, the
    training process decodes. A run stopped and resumed ends with the same weights as one in one go."""
    from _train_util import assert_same_training_state, run

    data = demo_root(tmp_path)
    args = TINY + ["--data", str(data), "--decode", "device", "--deterministic", "--batch-size", "25",
                   "--workers", "1", "--epochs", "2", "--ckpt-every", "0"]
    one_go = run(args + ["--output-dir", str(tmp_path / "one"), "--max-steps", "6"])
    assert one_go.returncode == 0, one_go.stdout
    assert "decoded by cpu" in one_go.stdout
    first = run(args + ["--output-dir", str(tmp_path / "two"), "--max-steps", "3"])
    assert first.returncode == 0, first.stdout
    second = run(args + ["--output-dir", str(tmp_path / "two"), "--max-steps", "6"])
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stdout
    assert_same_training_state(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt")
