"""The memory-efficient path under torch.compile, and what it refuses (SyncBatchNorm)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import densenet
from densenet.training.config import ConfigError, parse_config

# Some older releases trace checkpoint's context_fn (selective checkpointing) only behind this flag.
_SAC_FLAG = "_experimental_support_context_fn_in_torch_utils_checkpoint"


def _backend(name):
    if name != "cudagraphs-like":
        return name
    # What the cudagraphs backend (CUDA only) does with the graphs, minus the CUDA graphs: the default
    # partitioner, and buffer mutations written back after the graph rather than inside it.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def nop(gm, example_inputs):
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=nop, bw_compiler=nop, keep_inference_input_mutations=False)


def _two_steps(model, x):
    outs = []
    for _ in range(2):
        y = model(x)
        (y * torch.arange(float(y.shape[1]))).sum().backward()
        outs.append(y.detach())
    return outs


@pytest.mark.parametrize("arch, backend", [
    ("densenet_tiny", "aot_eager"),
    ("densenet_tiny", "cudagraphs-like"),
    pytest.param("densenet_tiny", "inductor", marks=pytest.mark.slow),  # ~40 s of C++ compilation, cold
    ("densenet121", "aot_eager"),
    # densenet121 with inductor takes ~160 s to compile on two CPU cores, so it is left out.
])
def test_memory_efficient_training_compiles_to_one_graph_matching_eager(arch, backend):
    torch.manual_seed(0)
    eager = densenet.create_model(arch, num_classes=10, memory_efficient=True).train()
    compiled = copy.deepcopy(eager)
    x = torch.randn(2, 3, 64, 64)
    flag = torch._dynamo.config.patch(**{_SAC_FLAG: True}) if hasattr(torch._dynamo.config, _SAC_FLAG) \
        else contextlib.nullcontext()
    torch._dynamo.reset()
    counters.clear()
    try:
        with flag:
            y_compiled = _two_steps(torch.compile(compiled, backend=_backend(backend), dynamic=False), x)
        breaks = sum(counters["graph_break"].values())
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    # A side effect inside the checkpointed region breaks the graph at every dense layer, and past
    # the recompile limit the remaining layers run eagerly.
    assert (breaks, graphs) == (0, 1), dict(counters["graph_break"])

    y_eager = _two_steps(eager, x)
    params, buffers = list(compiled.named_parameters()), list(compiled.named_buffers())
    if backend != "inductor":  # the same aten kernels in the same order: bitwise equal
        assert all(torch.equal(a, b) for a, b in zip(y_compiled, y_eager))
        for (name, p), q in zip(params, eager.parameters()):
            assert torch.equal(p.grad, q.grad), name
        for (name, a), b in zip(buffers, eager.buffers()):
            assert torch.equal(a, b), name
        return
    # Inductor reorders float reductions. Gradients whose entries nearly cancel (norm0's weight,
    # ~1e-4) carry that noise at the scale of the whole gradient, hence an absolute term from it.
    for a, b in zip(y_compiled, y_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    scale = max(float(q.grad.abs().max()) for q in eager.parameters())
    for (name, p), q in zip(params, eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
    for (name, a), b in zip(buffers, eager.buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name  # num_batches_tracked: 2, moved once per step


@pytest.mark.parametrize("mode", ["cumulative-momentum", "eval-with-grad"])
def test_memory_efficient_statistics_match_plain(mode):
    torch.manual_seed(0)
    plain = densenet.create_model("densenet_tiny")
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: the factor follows num_batches_tracked
            m.running_mean.uniform_(-0.1, 0.1)
    if mode == "eval-with-grad":
        plain.eval()
    eff = copy.deepcopy(plain)
    eff.set_memory_efficient(True)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    for a, b in zip(_two_steps(plain, x), _two_steps(eff, x)):
        assert torch.equal(a, b)
    for (name, a), b in zip(plain.named_buffers(), eff.buffers()):
        assert torch.equal(a, b), name
    tracked = eff.features.denseblock1.denselayer1.norm1.num_batches_tracked
    assert int(tracked) == (0 if mode == "eval-with-grad" else 2)


def test_config_refuses_sync_bn_with_memory_efficient():
    with pytest.raises(ConfigError, match="--sync-bn does not reach the memory-efficient") as e:
        parse_config(["--data", "demo", "--device", "cuda", "--sync-bn", "--memory-efficient"])
    assert "drop --memory-efficient or --sync-bn" in str(e.value) and "\n" not in str(e.value)
    assert parse_config(["--data", "demo", "--device", "cuda", "--sync-bn"]).sync_bn


def test_sync_batchnorm_conversion_of_memory_efficient_model_is_refused():
    # Without the refusal the dense layers would call F.batch_norm past the SyncBatchNorm modules:
    # only the stem, transitions and final norm (5 of densenet121's 121) would stay synchronised.
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(densenet.create_model("densenet_tiny", memory_efficient=True))
    assert isinstance(model.features.denseblock1.denselayer1.norm1, torch.nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="SyncBatchNorm does not reach memory-efficient dense layers") as e:
        model.train()(torch.randn(2, 3, 32, 32))
    assert "\n" not in str(e.value)
    model.set_memory_efficient(False)  # the fix the message names; without a process group SyncBN runs locally
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with torch.no_grad():  # inference never reaches the memory-efficient path
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(
            densenet.create_model("densenet_tiny", memory_efficient=True)).eval()(torch.randn(1, 3, 32, 32))
