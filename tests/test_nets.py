"""Networks: parameter counts, horizon checks, that conditioning reaches the output, and the
image encoder's crop and spatial-softmax maths."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_policy.config import ObsEncoderConfig, PolicyConfig
from diffusion_policy.nets import ConditionalUnet1D, MLPDenoiser, ObsEncoder, TransformerDenoiser, build_net
from diffusion_policy.nets.resnet import ResNet18GN, SpatialSoftmax, crop


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_default_unet_has_65_78m_parameters():
    """Chi et al.'s Push-T low-dim UNet: 20-dim observation, To=2, 2-dim action -> 65.78M."""
    with torch.device("meta"):  # no memory, no initialisation cost
        net = build_net(PolicyConfig(name="unet"), action_dim=2, horizon=16, n_obs_steps=2, cond_dim=20)
    assert n_params(net) == pytest.approx(65.78e6, rel=1e-3)


def test_unet_horizons():
    net = ConditionalUnet1D(3, cond_dim=2 * 5, down_dims=[16, 32, 64], time_embed_dim=16)
    for H in (4, 8, 12, 16, 32):
        out = net(torch.randn(2, H, 3), torch.tensor([0.0, 50.0]), torch.randn(2, 2, 5))
        assert out.shape == (2, H, 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 10, 3), torch.zeros(2), torch.randn(2, 2, 5))
    # one rule, one text, held by the UNet: its constructor applies it to the horizon it is built
    # for (build_net passes task.horizon), its forward to every chunk
    text = (r"task.horizon=10 must be divisible by 4: the UNet halves the chunk 2 times "
            r"\(policy.down_dims=\[8, 16, 32\]\)")
    with pytest.raises(ValueError, match=text):
        build_net(PolicyConfig(name="unet", down_dims=[8, 16, 32]), 2, 10, 2, 5)
    with pytest.raises(ValueError, match=text):
        ConditionalUnet1D(3, 10, down_dims=[8, 16, 32], time_embed_dim=16, horizon=10)
    assert ConditionalUnet1D(3, 10, down_dims=[8, 16, 32], time_embed_dim=16, horizon=12).downsample_factor == 4
    with pytest.raises(ValueError, match="cond flattens to 12 features, expected 10"):
        net(torch.randn(2, 8, 3), torch.zeros(2), torch.randn(2, 2, 6))


NETS = {
    "unet": lambda: ConditionalUnet1D(2, 2 * 3, down_dims=[16, 32], time_embed_dim=16),
    "transformer": lambda: TransformerDenoiser(2, 8, 3, 2, n_layer=2, n_head=2, n_emb=32, time_embed_dim=16),
    "mlp": lambda: MLPDenoiser(2, 8, 2 * 3, hidden_dims=[64, 64]),
}


@pytest.mark.parametrize("name", list(NETS))
def test_output_depends_on_time_condition_and_input(name):
    torch.manual_seed(0)
    net = NETS[name]().eval()
    x, t, c = torch.randn(4, 8, 2), torch.full((4,), 10.0), torch.randn(4, 2, 3)
    y = net(x, t, c)
    assert y.shape == (4, 8, 2) and torch.isfinite(y).all()
    assert not torch.allclose(y, net(x, t + 40.0, c), atol=1e-5), "time does not reach the output"
    assert not torch.allclose(y, net(x, t, c + 1.0), atol=1e-5), "condition does not reach the output"
    assert not torch.allclose(y, net(x + 1.0, t, c), atol=1e-5), "input does not reach the output"
    # a batch element only depends on its own inputs
    y2 = net(x[:2], t[:2], c[:2])
    torch.testing.assert_close(y2, y[:2], atol=1e-5, rtol=1e-5)
    # a scalar time broadcasts over the batch
    torch.testing.assert_close(net(x, torch.tensor(10.0), c), y, atol=1e-5, rtol=1e-5)


def test_no_batchnorm_anywhere():
    enc = ObsEncoder({"image": (32, 32, 3)}, ["image"], ObsEncoderConfig(backbone_width=16))
    nets = [enc, *(f() for f in NETS.values())]
    for net in nets:
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in enc.modules())


def test_resnet18_layout():
    """Standard ResNet-18 convolutions (11.2M parameters at width 64 without the fc layer)."""
    net = ResNet18GN(feature_dim=64, width=64)
    convs = [m for m in net.stages.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 16  # 4 stages x 2 blocks x 2 convs (+ stem = 17 weighted 3x3/7x7 layers)
    body = n_params(net.stem) + n_params(net.stages)
    assert body == pytest.approx(11.17e6, rel=0.01)
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 64)


def test_spatial_softmax_finds_a_bright_spot():
    """With a 1x1 conv that copies the input, each keypoint is the expected (x, y) of its map."""
    head = SpatialSoftmax(in_ch=2, num_kp=2)
    with torch.no_grad():
        head.kp.weight.copy_(torch.eye(2).view(2, 2, 1, 1) * 50.0)
        head.kp.bias.zero_()
    fmap = torch.zeros(1, 2, 5, 7)
    fmap[0, 0, 1, 6] = 1.0  # pixel centres (2i + 1) / n - 1: row 1 of 5 -> y = -0.4, col 6 of 7 -> x = 6/7
    fmap[0, 1, 4, 0] = 1.0  # row 4 -> y = 0.8; col 0 -> x = -6/7
    kp = head(fmap).view(2, 2)
    torch.testing.assert_close(kp, torch.tensor([[6 / 7, -0.4], [-6 / 7, 0.8]]), atol=1e-3, rtol=0)


def test_crop_random_in_train_and_center_in_eval():
    img = torch.arange(2 * 3 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 3, 10, 10)
    center = crop(img, (8, 8), random=False)
    torch.testing.assert_close(center, img[..., 1:9, 1:9])
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        out = crop(img, (8, 8), random=True)
        for b in range(2):
            top, left = int(out[b, 0, 0, 0, 0] // 10 % 10), int(out[b, 0, 0, 0, 0] % 10)
            # every step and channel of a sample shares its window
            torch.testing.assert_close(out[b], img[b, :, :, top:top + 8, left:left + 8])
            seen.add((top, left))
    assert len(seen) > 3


def test_obs_encoder_lowdim_and_images():
    shapes = {"agent_pos": (2,), "front": (48, 48, 3), "wrist": (48, 48, 3)}
    cfg = ObsEncoderConfig(crop_ratio=0.75, image_feature_dim=8, backbone_width=8)
    enc = ObsEncoder(shapes, ["front", "wrist"], cfg)
    assert enc.out_dim == 2 + 2 * 8 and set(enc.backbones) == {"front", "wrist"}
    shared = ObsEncoder(shapes, ["front", "wrist"], ObsEncoderConfig(0.75, True, 8, 8))
    assert set(shared.backbones) == {"shared"} and n_params(shared) * 2 == n_params(enc)
    obs = {"agent_pos": torch.randn(3, 2, 2), "front": torch.rand(3, 2, 3, 48, 48),
           "wrist": torch.rand(3, 2, 3, 48, 48)}
    enc.eval()
    out = enc(obs)
    assert out.shape == (3, 2, enc.out_dim)
    torch.testing.assert_close(out[..., :2], obs["agent_pos"])  # low-dim keys pass through, in order
    torch.testing.assert_close(enc(obs), out)  # center crop: deterministic
    enc.train()
    torch.manual_seed(0)
    assert not torch.allclose(enc(obs), enc(obs))  # random crops differ
    with pytest.raises(ValueError, match="expected \\(B, To, 3, H, W\\)"):
        enc({**obs, "front": torch.rand(3, 2, 48, 48, 3)})
    with pytest.raises(KeyError, match="missing keys \\['wrist'\\]"):
        enc({k: v for k, v in obs.items() if k != "wrist"})


def test_lowdim_encoder_concatenates_keys():
    enc = ObsEncoder({"a": (3,), "b": (2,)})
    obs = {"a": torch.randn(4, 2, 3), "b": torch.randn(4, 2, 2)}
    torch.testing.assert_close(enc(obs), torch.cat([obs["a"], obs["b"]], -1))
    assert enc.out_dim == 5 and n_params(enc) == 0
