"""Sliding-window prediction: the fast paths give the plain paths' answers."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from medseg.engine.runtime import to_channels_last
from medseg.engine.sliding import class_sigmoid, class_softmax, label_map, predict_logits, stream_logits


def test_label_map_is_argmax_with_first_maximum_on_ties() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 13, 7, 9, generator=g)
    assert torch.equal(label_map(scores), scores.argmax(0).to(torch.uint8))
    tied = torch.zeros(3, 5, 6, 7)
    tied[1:, :2] = 1.0  # classes 1 and 2 tie: argmax takes 1
    assert torch.equal(label_map(tied), tied.argmax(0).to(torch.uint8))
    assert label_map(scores[:1]).eq(0).all()
    cl = scores[None].to(memory_format=torch.channels_last_3d)[0]  # the layout a channels-last network returns
    assert torch.equal(label_map(cl), scores.argmax(0).to(torch.uint8))


def _sphere_case(shape=(40, 36, 29)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    centre = torch.tensor([s / 2 for s in shape]).view(3, 1, 1, 1)
    label = ((grid - centre).pow(2).sum(0) < 9.5**2).long()
    image = label.float() + 0.3 * torch.randn(shape, generator=g)
    return image[None], label


@pytest.fixture(scope="module")
def trained_unet() -> UNet:
    """A small 3D U-Net trained until it segments the sphere, so agreement is measured on a real mask."""
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="instance")
    image, label = _sphere_case()
    optimiser = torch.optim.Adam(net.parameters(), 1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(40):
        optimiser.zero_grad()
        loss_fn(net(image[None, :, :32, :32, :24]), label[None, None, :32, :32, :24]).backward()
        optimiser.step()
    return net.eval()


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_channels_last_predictions_equal_contiguous_ones(trained_unet: UNet) -> None:
    image, _ = _sphere_case()
    plain = predict_logits(trained_unet, image, (16, 16, 16), overlap=0.5)
    cl_net = to_channels_last(copy.deepcopy(trained_unet), 3)
    assert cl_net.model[0].conv.unit0.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    same = predict_logits(cl_net, image, (16, 16, 16), overlap=0.5)
    assert torch.allclose(same, plain, atol=1e-4)
    assert torch.equal(label_map(same), label_map(plain))


def test_bf16_and_fp32_predictions_agree(trained_unet: UNet) -> None:
    image, label = _sphere_case()
    fp32 = label_map(predict_logits(trained_unet, image, (16, 16, 16), overlap=0.5)).bool()
    bf16 = label_map(predict_logits(trained_unet, image, (16, 16, 16), overlap=0.5, amp_dtype=torch.bfloat16)).bool()
    truth = label.bool()
    assert _dice(fp32, truth) > 0.8, "the network did not learn the sphere; the comparison would mean nothing"
    assert _dice(bf16, fp32) > 0.99
    assert abs(_dice(bf16, truth) - _dice(fp32, truth)) < 0.005


def test_folding_batch_norms_keeps_the_outputs_and_removes_the_norms() -> None:
    from monai.networks.blocks import Convolution

    from medseg.engine.sliding import fold_batch_norms

    torch.manual_seed(0)
    net = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch")
    net.train()
    with torch.no_grad():  # running statistics far from the identity, as after training
        for _ in range(3):
            net(torch.randn(2, 1, 16, 16, 16) * 3 + 1)
    net.eval()
    with pytest.raises(ValueError, match="training mode"):
        fold_batch_norms(copy.deepcopy(net).train())
    x = torch.randn(1, 17, 23, 19)  # channel-first volume
    with torch.no_grad():
        expected = predict_logits(net, x, (16, 16, 16), overlap=0.5)
        folded = to_channels_last(fold_batch_norms(copy.deepcopy(net)), 3)
        got = predict_logits(folded, x, (16, 16, 16), overlap=0.5)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(label_map(got), label_map(expected))
    # a norm after the activation cannot be folded into the convolution: left alone
    late = Convolution(3, 2, 4, norm="batch", act="prelu", adn_ordering="AN").eval()
    assert isinstance(fold_batch_norms(late).adn.N, torch.nn.BatchNorm3d)
    # instance norms depend on each input: untouched
    inst = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1, norm="instance").eval()
    assert sum(isinstance(m, torch.nn.InstanceNorm3d) for m in fold_batch_norms(inst).modules()) > 0


@pytest.mark.parametrize("shape, roi, overlap, batch", [
    ((37, 29, 23), (16, 16, 16), 0.5, 4),
    ((13, 40, 21), (16, 16, 8), 0.25, 3),  # the first axis shorter than the patch: padded
    ((40, 12, 30), (16, 16, 16), 0.5, 1),  # one window per batch: MONAI hands it over uncopied
])
def test_streamed_slabs_are_the_whole_volumes_logits(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float,
                                                     batch: int) -> None:
    torch.manual_seed(0)
    net = UNet(3, 1, 4, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="instance").eval()
    image = torch.randn(1, *shape)
    whole = predict_logits(net, image, roi, overlap=overlap, sw_batch_size=batch)
    for axis in range(3):
        slabs = list(stream_logits(net, image, roi, overlap=overlap, sw_batch_size=batch, axis=axis))
        assert [s[0] for s in slabs] == [0, *[s[1] for s in slabs[:-1]]] and slabs[-1][1] == shape[axis]
        joined = torch.cat([s[2] for s in slabs], dim=1 + axis)
        if axis == 0:  # MONAI's window order: every addition the same, so bitwise
            assert torch.equal(joined, whole)
        else:  # another order of the same sums
            torch.testing.assert_close(joined, whole, rtol=0, atol=1e-5)


def test_class_softmax_of_a_slab_is_bitwise_the_whole_volumes() -> None:
    g = torch.Generator().manual_seed(0)
    for classes in (2, 3, 17):
        logits = 4 * torch.randn(classes, 37, 21, 13, generator=g)
        whole = class_softmax(logits, 1.3)
        torch.testing.assert_close(whole, torch.softmax(logits / 1.3, 0), rtol=0, atol=1e-6)
        for start, stop in ((0, 5), (5, 6), (6, 30), (30, 37)):
            assert torch.equal(class_softmax(logits[:, start:stop], 1.3), whole[:, start:stop])
            assert torch.equal(class_sigmoid(logits[:, start:stop]), class_sigmoid(logits)[:, start:stop])
    torch.testing.assert_close(class_sigmoid(logits), torch.sigmoid(logits), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, roi, overlap, axis, bands, batch", [
    ((23, 31, 13), (8, 8, 8), 0.5, 2, (0,), 3),  # batches span columns and rows
    ((23, 31, 13), (8, 8, 8), 0.5, 2, (0, 1), 3),  # a block of a column at a time
    ((9, 40, 21), (16, 8, 8), 0.25, 2, (0, 1), 1),  # the first band shorter than the patch: padded
    ((37, 17, 11), (8, 8, 8), 0.5, 0, (1, 2), 3),
    ((11, 12, 50), (16, 16, 8), 0.25, 2, (0, 1), 2),  # one column of windows
])
def test_tiles_along_bands_are_the_whole_slabs_bitwise(shape, roi, overlap, axis, bands, batch) -> None:
    """Slabs also cut along band axes (a block given out once the last window over it is added) hold the
    whole slabs' scores bitwise, each voxel given out once, each tile after its neighbours before it
    along each band, a row's tiles before the next row's."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 7, 3, padding=1).eval()
    image = torch.randn(1, *shape)

    def assemble(pieces, tiled: bool) -> tuple[torch.Tensor, list]:
        out, order = torch.full((7, *shape), float("nan")), []
        for piece in pieces:
            start, stop, *ranges, scores = piece
            where = [slice(None)] * 4
            where[1 + axis] = slice(start, stop)
            if tiled:
                for band, (lo, hi) in zip(bands, ranges[0]):
                    where[1 + band] = slice(lo, hi)
                for band, (lo, _) in zip(bands, ranges[0]):
                    if lo > 0:  # the tile before it along this band is out already, for these slices
                        before = list(where)
                        before[1 + band] = slice(lo - 1, lo)
                        assert not torch.isnan(out[tuple(before)]).any()
                order.append((start, stop, ranges[0]))
            assert torch.isnan(out[tuple(where)]).all()  # given out once
            out[tuple(where)] = scores
        return out, order

    common = dict(overlap=overlap, sw_batch_size=batch, axis=axis, device=torch.device("cpu"))
    whole, _ = assemble(stream_logits(net, image, roi, **common), False)
    tiled, order = assemble(stream_logits(net, image, roi, bands=bands, **common), True)
    assert not torch.isnan(tiled).any() and torch.equal(whole, tiled)
    rows = [o for o in order if all(lo == 0 for lo, _ in o[2])]  # a row starts at every band's start
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
