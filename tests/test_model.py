"""The DenseNet-BC family: structure, torchvision compatibility, memory-efficient and channels_last paths."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torchvision

import densenet
from densenet.model import _DenseBlock, _DenseLayer
from densenet.weights import export_torchvision, load_state_dict_file

IMAGENET_MODELS = ["densenet121", "densenet169", "densenet201", "densenet161"]

TORCHVISION_PARAMS = {
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet161": 28_681_000,
}


def _legacy_keys(state_dict):
    """Rename keys the way old torchvision weight files spell them (`norm.1`, `conv.2`, ...)."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(.*)$")
    out = {}
    for k, v in state_dict.items():
        m = pattern.match(k)
        out[f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else k] = v
    return out


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_parameter_counts_equal_torchvision(name):
    model = densenet.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


def test_densenet_bc_100_matches_the_paper():
    model = densenet.create_model("densenet_bc_100")
    params = sum(p.numel() for p in model.parameters())
    assert 0.74e6 < params < 0.80e6, params  # the paper reports 0.8M
    assert model.num_classes == 10
    blocks = [m for m in model.features if isinstance(m, _DenseBlock)]
    assert [len(b) for b in blocks] == [16, 16, 16]
    assert model.features.conv0.kernel_size == (3, 3) and model.features.conv0.out_channels == 24
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_imagenet_stem_and_bottleneck_structure():
    model = densenet.densenet121()
    f = model.features
    assert (f.conv0.kernel_size, f.conv0.stride) == ((7, 7), (2, 2))
    assert isinstance(f.pool0, torch.nn.MaxPool2d) and f.pool0.kernel_size == 3 and f.pool0.stride == 2
    layer = f.denseblock1.denselayer1
    assert layer.conv1.kernel_size == (1, 1) and layer.conv1.out_channels == 4 * 32
    assert layer.conv2.kernel_size == (3, 3) and layer.conv2.out_channels == 32
    # Compression 0.5: 64 + 6*32 = 256 channels in, 128 out of the first transition.
    assert (f.transition1.conv.in_channels, f.transition1.conv.out_channels) == (256, 128)
    assert isinstance(f.transition1.pool, torch.nn.AvgPool2d)


@pytest.mark.parametrize("name", IMAGENET_MODELS)
@pytest.mark.parametrize("legacy", [False, True], ids=["current-keys", "legacy-keys"])
def test_torchvision_weights_load_strictly_and_give_the_same_logits(name, legacy, tmp_path):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=7)
    # Non-trivial BN statistics, so eval mode really exercises the running averages.
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = tv.state_dict()
    path = tmp_path / "tv.pth"
    torch.save(_legacy_keys(sd) if legacy else sd, path)
    ours = densenet.create_model(name, num_classes=7)
    ours.load_state_dict(load_state_dict_file(path), strict=True)
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        tv.train(train)
        ours.train(train)
        with torch.no_grad():
            diff = (ours(x) - tv(x)).abs().max().item()
        assert diff <= 1e-5, (name, train, diff)


def test_our_checkpoint_exports_to_a_file_torchvision_loads(tmp_path):
    torch.manual_seed(0)
    ours = densenet.create_model("densenet121", num_classes=5)
    # A checkpoint as the trainer writes it, taken (wrongly but commonly) from a DDP/compiled wrapper.
    wrapped = {f"module._orig_mod.{k}": v for k, v in ours.state_dict().items()}
    ckpt = tmp_path / "last.pt"
    torch.save({"model": wrapped, "arch": "densenet121", "config": {"epochs": 1}}, ckpt)
    out = export_torchvision(ckpt, tmp_path / "export" / "tv.pth")
    tv = torchvision.models.densenet121(num_classes=5)
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ours.eval(), tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))


def test_not_a_densenet_file_is_rejected_clearly(tmp_path):
    bad = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), bad)
    with pytest.raises(ValueError, match="not a DenseNet checkpoint"):
        load_state_dict_file(bad)
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": densenet.densenet_tiny().state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="could not be read"):
        load_state_dict_file(truncated)
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "missing.pt")


def _saved_bytes(model, x):
    """Bytes autograd keeps for backward during one forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, total


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_memory_efficient_matches_plain_outputs_gradients_and_statistics(drop_rate):
    torch.manual_seed(0)
    plain = densenet.create_model("densenet121", num_classes=10, drop_rate=drop_rate)
    eff = copy.deepcopy(plain)
    eff.set_memory_efficient(True)
    assert eff.memory_efficient and not plain.memory_efficient
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(1)
    y_plain, saved_plain = _saved_bytes(plain, x)
    torch.manual_seed(1)
    y_eff, saved_eff = _saved_bytes(eff, x)
    (y_plain * torch.arange(10.0)).sum().backward()
    (y_eff * torch.arange(10.0)).sum().backward()
    assert torch.allclose(y_plain, y_eff, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), eff.parameters()):
        rel = (p.grad - q.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert rel <= 1e-5, (name, rel.item())
    # The recomputation must not move the BN running averages a second time.
    for (name, a), b in zip(plain.named_buffers(), eff.buffers()):
        assert torch.equal(a, b), name
    # What autograd keeps for backward is where the memory goes; the efficient path keeps far less.
    # (The 3x3 outputs that selective checkpointing keeps bypass these hooks; they are each layer's
    # new features, which later layers hold anyway. Peak RSS is measured by densenet.bench step.)
    assert saved_eff < 0.5 * saved_plain, (saved_eff, saved_plain)


def test_memory_efficient_is_plain_in_inference():
    model = densenet.create_model("densenet_tiny", memory_efficient=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_channels_last_layout_is_kept_through_every_concatenation():
    torch.manual_seed(0)
    model = densenet.create_model("densenet121", num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    seen = []

    def check(module, inputs, output):
        seen.append((type(module).__name__, output.is_contiguous(memory_format=torch.channels_last)))
        if isinstance(module, _DenseLayer):
            seen.append(("layer-input", all(t.is_contiguous(memory_format=torch.channels_last) for t in inputs[0])))

    hooks = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, (_DenseLayer, _DenseBlock))]
    with torch.no_grad():
        out = model(x.to(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    assert len(seen) > 100
    assert all(ok for _, ok in seen), [s for s in seen if not s[1]][:5]
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_feature_head_split_and_reset_classifier():
    model = densenet.create_model("densenet121", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1024, 2, 2) and feats.min() >= 0  # after the final BN-ReLU
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 1024)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 1024)


def test_drop_rate_drops_new_features_in_training_only():
    model = densenet.create_model("densenet_tiny", drop_rate=0.5)
    assert all(m.drop_rate == 0.5 for m in model.modules() if isinstance(m, _DenseLayer))
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)


def test_unknown_names_and_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown model 'densenet122'.*densenet121"):
        densenet.create_model("densenet122")
    with pytest.raises(ValueError, match="compression"):
        densenet.create_model("densenet121", compression=0.0)
    with pytest.raises(ValueError, match="growth_rate"):
        densenet.create_model("densenet121", growth_rate=0)
    with pytest.raises(ValueError, match="drop_rate"):
        densenet.create_model("densenet121", drop_rate=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        densenet.create_model("densenet121", num_classes=0)
    with pytest.raises(TypeError, match="unknown DenseNet option"):
        densenet.create_model("densenet121", growth=12)
    assert densenet.list_models() == sorted(densenet.list_models())
    assert set(IMAGENET_MODELS) | {"densenet_bc_100"} <= set(densenet.list_models())
