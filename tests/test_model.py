"""U-Net: Pytorch-UNet's parameter counts, any input size, forward + backward, 1 or 3 channels."""

import pytest
import torch

from seg.model import UNet, build_model, count_parameters


@pytest.mark.parametrize("bilinear, expected", [(False, 31_037_633), (True, 17_262_977)])
def test_parameter_counts_match_the_seed(bilinear, expected):
    assert count_parameters(build_model(3, 64, bilinear)) == expected  # built only, no forward at full size


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(37, 50), (16, 16), (65, 33)])
def test_output_has_the_input_size(bilinear, size):
    model = UNet(3, base_channels=4, bilinear=bilinear).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 1, *size)


def test_padding_does_not_shift_the_output():
    """An odd-sized input gives the centre crop of the output for the padded input."""
    torch.manual_seed(0)
    model = UNet(1, base_channels=4).eval()
    x = torch.randn(1, 1, 30, 30)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # 32 x 32, what forward pads to
    with torch.no_grad():
        assert torch.allclose(model(x), model(padded)[..., 1:31, 1:31], atol=1e-5)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_backward_tiny_model(in_channels):
    torch.manual_seed(0)
    model = UNet(in_channels, base_channels=4)
    x = torch.randn(2, in_channels, 32, 32)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), torch.ones(2, 1, 32, 32))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_wrong_input_channels_name_the_fix():
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, H, W\), got \(1, 3, 16, 16\)"):
        UNet(1, base_channels=4)(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="in_channels=2"):
        UNet(2)


def test_config_rebuilds_the_model():
    model = UNet(1, base_channels=4, bilinear=True)
    clone = build_model(**model.config())
    assert clone.config() == {"in_channels": 1, "base_channels": 4, "bilinear": True, "norm": "batch"}
    clone.load_state_dict(model.state_dict())


@pytest.mark.parametrize("norm, layer", [("batch", torch.nn.BatchNorm2d), ("group", torch.nn.GroupNorm),
                                         ("instance", torch.nn.InstanceNorm2d)])
def test_norm_option_builds_that_layer_and_rebuilds_from_config(norm, layer):
    model = UNet(1, base_channels=4, norm=norm)
    kinds = {type(m) for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm,
                                                                 torch.nn.InstanceNorm2d))}
    assert kinds == {layer}
    clone = build_model(**model.config())
    clone.load_state_dict(model.state_dict())  # same parameter names and shapes
    assert clone.config()["norm"] == norm


def test_group_and_instance_norm_give_the_same_output_in_train_and_eval_mode():
    """No running statistics: the evaluation output equals the training-mode output."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    for norm in ("group", "instance"):
        model = UNet(1, base_channels=4, norm=norm)
        with torch.no_grad():
            train_out = model.train()(x)
            assert torch.allclose(model.eval()(x), train_out, atol=1e-6)
    bn = UNet(1, base_channels=4, norm="batch")
    with torch.no_grad():
        assert not torch.allclose(bn.eval()(x), bn.train()(x), atol=1e-3)


def test_group_norm_groups_divide_the_width():
    assert build_model(1, 4, norm="group").inc.block[1].num_groups == 4
    assert build_model(1, 12, norm="group").inc.block[1].num_groups == 4
    assert build_model(1, 32, norm="group").inc.block[1].num_groups == 8
    with pytest.raises(ValueError, match="norm='layer' is not valid; valid options are batch, group, instance"):
        UNet(1, 4, norm="layer")
