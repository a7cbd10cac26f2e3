"""Logit parity with the peers: timm's own .npz loader and HF transformers' BitForImageClassification.

The checkpoint is written by `npz_reference` (from REFERENCE.md's names, not from our converter).
Tolerance 1e-4 relative: timm and HF standardise with eps 1e-8, the authors (and we) with 1e-10.
"""

import numpy as np
import pytest
import torch

import bigtransfer as bt
from npz_reference import random_bit_npz

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

CASES = [  # (registry name, timm name, depths, width)
    ("BiT-M-R50x1", "resnetv2_50x1_bit", (3, 4, 6, 3), 1),
    ("BiT-M-R101x1", "resnetv2_101x1_bit", (3, 4, 23, 3), 1),
    ("BiT-M-R50x3", "resnetv2_50x3_bit", (3, 4, 6, 3), 3),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name,timm_name,depths,width", CASES, ids=[c[0] for c in CASES])
def test_logits_match_timm_and_hf(tmp_path, name, timm_name, depths, width):
    npz = tmp_path / "ref.npz"
    random_bit_npz(npz, depths, width, num_classes=7, seed=width)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))

    ours = bt.create_model(name, pretrained=npz).eval()
    assert ours.num_classes == 7  # head size taken from the checkpoint
    with torch.no_grad():
        logits = ours(x)
    assert logits.abs().max() > 0.1  # a real, non-degenerate head

    peer = timm.create_model(timm_name, pretrained=False, num_classes=7)
    peer.load_pretrained(str(npz))
    with torch.no_grad():
        assert rel_err(logits, peer.eval()(x)) <= 1e-4
    del peer

    bt.save_weights(ours, tmp_path / "hf", format="hf")
    hf = transformers.BitForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert rel_err(logits, hf(x).logits) <= 1e-4


def test_round_trips_are_exact(tmp_path):
    """npz -> ours -> npz, and npz -> timm -> ours -> HF -> ours, bit for bit (R50x1)."""
    arrays = random_bit_npz(tmp_path / "a.npz", (3, 4, 6, 3), 1, num_classes=5)
    model = bt.create_model("BiT-M-R50x1", pretrained=tmp_path / "a.npz")

    bt.save_weights(model, tmp_path / "b.npz", format="npz")
    with np.load(tmp_path / "b.npz", allow_pickle=False) as back:
        assert set(back.files) == set(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(back[key], value, err_msg=key)

    reference = {k: v.clone() for k, v in model.state_dict().items()}
    bt.save_weights(model, tmp_path / "t.pth", format="timm")
    via_timm = bt.create_model("BiT-M-R50x1", pretrained=tmp_path / "t.pth")
    bt.save_weights(via_timm, tmp_path / "hf.safetensors", format="hf")
    via_hf = bt.create_model("BiT-M-R50x1", pretrained=tmp_path / "hf.safetensors")
    bt.save_weights(via_hf, tmp_path / "ours.safetensors")
    final = bt.create_model("BiT-M-R50x1", pretrained=tmp_path / "ours.safetensors")
    assert [bt.read_checkpoint(tmp_path / f).format for f in ("t.pth", "hf.safetensors", "ours.safetensors")] == [
        "timm", "hf", "safetensors"]
    for key, value in final.state_dict().items():
        assert torch.equal(value, reference[key]), key
