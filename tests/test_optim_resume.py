"""Resuming optimizer state into another memory layout or another kernel (fused, loop) gives the same update."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from densenet.training.optim import load_optimizer_state

CL = torch.channels_last


def tiny_model(memory_format: torch.memory_format, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))
    return model.to(memory_format=memory_format)


def backward(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 8, 8)
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(data: bytes):
    # A fresh copy per resume, as from a file: load_state_dict does not copy tensors that already have
    # the parameter's device and dtype, so two optimizers loading one dict would share their buffers.
    return torch.load(io.BytesIO(data), weights_only=True)


def checkpoint(make_opt, memory_format: torch.memory_format, steps: int = 3):
    model = tiny_model(memory_format)
    opt = make_opt(model.parameters())
    for i in range(steps):
        backward(model, seed=i)
        opt.step()
    return saved(model.state_dict()), saved(opt.state_dict())


def resume(make_opt, weights, opt_state, memory_format: torch.memory_format, steps: int = 2):
    model = tiny_model(memory_format, seed=1)
    model.load_state_dict(load(weights))
    opt = make_opt(model.parameters())
    load_optimizer_state(opt, load(opt_state))
    for i in range(steps):
        backward(model, seed=100 + i)
        opt.step()
    return model, opt


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if x.is_floating_point())


def assert_state_has_param_layout(opt: torch.optim.Optimizer) -> None:
    checked = 0
    for group in opt.param_groups:
        for p in group["params"]:
            for key, t in opt.state[p].items():
                if torch.is_tensor(t) and t.shape == p.shape:
                    assert t.stride() == p.stride(), (key, tuple(p.shape), t.stride(), p.stride())
                    checked += 1
    assert checked


def sgd(**kernels):
    return lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, **kernels)


def adamw(**kernels):
    return lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, **kernels)


@pytest.mark.parametrize("saved_format,resumed_format", [(CL, torch.contiguous_format), (torch.contiguous_format, CL)],
                         ids=["channels_last-to-contiguous", "contiguous-to-channels_last"])
def test_fused_sgd_resumed_in_the_other_layout_matches_the_loop_kernel(saved_format, resumed_format):
    weights, opt_state = checkpoint(sgd(foreach=False), saved_format)
    conv_buf = load(opt_state)["state"][0]["momentum_buffer"]
    assert conv_buf.is_contiguous(memory_format=saved_format) and not conv_buf.is_contiguous(
        memory_format=resumed_format)  # the checkpoint really holds the other layout
    fused, fused_opt = resume(sgd(fused=True), weights, opt_state, resumed_format)
    loop, _ = resume(sgd(foreach=False), weights, opt_state, resumed_format)
    assert next(fused.parameters()).is_contiguous(memory_format=resumed_format)
    assert max_weight_diff(fused, loop) < 1e-5
    assert_state_has_param_layout(fused_opt)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["default-float32", "default-float64"])
def default_dtype(request):
    # Under a float64 default the loop kernel's `step` is float64, which the fused kernel does not take.
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


def test_fused_adamw_resumed_from_a_loop_checkpoint_matches_the_loop_kernel(default_dtype):
    weights, opt_state = checkpoint(adamw(foreach=False), CL)
    saved_step = load(opt_state)["state"][0]["step"]
    assert saved_step.device.type == "cpu" and saved_step.dtype == default_dtype
    fused, fused_opt = resume(adamw(fused=True), weights, opt_state, torch.contiguous_format, steps=1)
    loop, loop_opt = resume(adamw(foreach=False), weights, opt_state, torch.contiguous_format, steps=1)
    for opt, dtype in ((fused_opt, torch.float32), (loop_opt, default_dtype)):
        for group in opt.param_groups:
            for p in group["params"]:
                step = opt.state[p]["step"]
                assert step.shape == () and step.device == p.device and step.dtype == dtype and step.item() == 4
    assert all(g["fused"] for g in fused_opt.param_groups)
    assert max_weight_diff(fused, loop) < 1e-5
    assert_state_has_param_layout(fused_opt)


@pytest.mark.parametrize("make_opt", [sgd(foreach=False), sgd(fused=True), adamw(foreach=True), adamw(fused=True)],
                         ids=["sgd-loop", "sgd-fused", "adamw-foreach", "adamw-fused"])
def test_loaded_state_has_the_parameters_strides(make_opt):
    _, opt_state = checkpoint(make_opt, CL, steps=1)
    model = tiny_model(torch.contiguous_format)
    opt = make_opt(model.parameters())
    load_optimizer_state(opt, load(opt_state))
    assert_state_has_param_layout(opt)
