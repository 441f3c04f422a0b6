"""Preservation metrics: CIEDE2000 against Sharma et al. (2005), masked PSNR, object expansion, the report."""
import json
import math

import numpy as np
import pytest
import torch

from productbg.imaging import metrics as mt
from productbg.imaging.color import srgb_to_lab

# Test data of G. Sharma, W. Wu, E. N. Dalal, "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Color Res. Appl. 30(1), 2005 — Table 1, pairs 1–34.
SHARMA_2005 = [
    ((50.0000, 2.6772, -79.7751), (50.0000, 0.0000, -82.7485), 2.0425),
    ((50.0000, 3.1571, -77.2803), (50.0000, 0.0000, -82.7485), 2.8615),
    ((50.0000, 2.8361, -74.0200), (50.0000, 0.0000, -82.7485), 3.4412),
    ((50.0000, -1.3802, -84.2814), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -1.1848, -84.8006), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -0.9009, -85.5211), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, 0.0000, 0.0000), (50.0000, -1.0000, 2.0000), 2.3669),
    ((50.0000, -1.0000, 2.0000), (50.0000, 0.0000, 0.0000), 2.3669),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0009), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0010), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0011), 7.2195),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0012), 7.2195),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0009, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0010, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0011, -2.4900), 4.7461),
    ((50.0000, 2.5000, 0.0000), (50.0000, 0.0000, -2.5000), 4.3065),
    ((50.0000, 2.5000, 0.0000), (73.0000, 25.0000, -18.0000), 27.1492),
    ((50.0000, 2.5000, 0.0000), (61.0000, -5.0000, 29.0000), 22.8977),
    ((50.0000, 2.5000, 0.0000), (56.0000, -27.0000, -3.0000), 31.9030),
    ((50.0000, 2.5000, 0.0000), (58.0000, 24.0000, 15.0000), 19.4535),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.1736, 0.5854), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2972, 0.0000), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 1.8634, 0.5757), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2592, 0.3350), 1.0000),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((63.0109, -31.0961, -5.8663), (62.8187, -29.7946, -4.0864), 1.2630),
    ((61.2901, 3.7196, -5.3901), (61.4292, 2.2480, -4.9620), 1.8731),
    ((35.0831, -44.1164, 3.7933), (35.0232, -40.0716, 1.5901), 1.8645),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((36.4612, 47.8580, 18.3852), (36.2715, 50.5065, 21.2231), 1.4146),
    ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
    ((6.7747, -0.2908, -2.4247), (5.8714, -0.0985, -2.2286), 0.6377),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


def test_ciede2000_matches_sharma_2005_reference_pairs():
    """All 34 published pairs to the 4 decimals printed in the paper (hue wrap-around cases included)."""
    lab1 = np.array([p[0] for p in SHARMA_2005])
    lab2 = np.array([p[1] for p in SHARMA_2005])
    expected = np.array([p[2] for p in SHARMA_2005])
    np.testing.assert_array_equal(np.round(mt.ciede2000(lab1, lab2), 4), expected)


def test_ciede2000_is_symmetric_and_zero_on_identity_and_takes_tensors():
    lab = np.random.default_rng(0).uniform([0, -80, -80], [100, 80, 80], (100, 3))
    other = lab[::-1]
    np.testing.assert_allclose(mt.ciede2000(lab, other), mt.ciede2000(other, lab), atol=1e-12)
    assert mt.ciede2000(lab, lab).max() == 0
    assert mt.ciede2000(torch.tensor(lab[:2]), torch.tensor(lab[2:4])).shape == (2,)


def test_srgb_to_lab_known_values():
    """White is L=100 neutral; sRGB red is the textbook (53.24, 80.09, 67.20)."""
    np.testing.assert_allclose(srgb_to_lab(np.array([1.0, 1.0, 1.0])), [100, 0, 0], atol=1e-2)
    np.testing.assert_allclose(srgb_to_lab(np.array([1.0, 0.0, 0.0])), [53.24, 80.09, 67.20], atol=1e-2)


def test_masked_psnr_hand_computed():
    """Inside the mask every channel is off by 0.1 → MSE 0.01 → 20 dB; outside differences are ignored."""
    reference = np.zeros((4, 4, 3), np.float32)
    test = np.zeros((4, 4, 3), np.float32)
    mask = np.zeros((4, 4), np.float32)
    mask[:2] = 1
    test[:2] = 0.1
    test[2:] = 0.9
    assert mt.masked_psnr(reference, test, mask) == pytest.approx(20.0, abs=1e-4)
    assert math.isinf(mt.masked_psnr(reference, reference, mask))
    with pytest.raises(ValueError, match="empty"):
        mt.masked_psnr(reference, test, np.zeros((4, 4)))


def test_color_drift_of_a_uniform_shift():
    """Mean and max ΔE00 of a uniformly shifted product equal ΔE00 of the two colours."""
    a = np.broadcast_to(np.float32([0.8, 0.2, 0.1]), (6, 6, 3)).copy()
    b = np.broadcast_to(np.float32([0.7, 0.25, 0.1]), (6, 6, 3)).copy()
    expected = float(mt.ciede2000(srgb_to_lab(a[0, 0].astype(np.float64)), srgb_to_lab(b[0, 0].astype(np.float64))))
    drift = mt.color_drift(a, b, np.ones((6, 6)))
    assert drift["mean"] == pytest.approx(expected, rel=1e-5) and drift["max"] == pytest.approx(expected, rel=1e-5)


def test_object_expansion_on_hand_made_masks():
    """Input 10×10 = 100 px; output adds 20 px outside and loses 5 inside → E = 20, ratio 0.2."""
    mask_in = np.zeros((20, 20), np.float32)
    mask_in[5:15, 5:15] = 1
    mask_out = mask_in.copy()
    mask_out[15:17, 5:15] = 1        # 20 new pixels
    mask_out[5, 5:10] = 0            # 5 lost pixels do not count
    assert mt.object_expansion(mask_in, mask_out) == {"pixels": 20.0, "ratio": 0.2}
    assert mt.object_expansion(mask_in, mask_in)["pixels"] == 0


def test_report_pass_fail_and_json():
    """Checks follow the thresholds; only measured checks count; the report is plain JSON."""
    product = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), np.float32)
    mask[4:12, 4:12] = 1
    grown = mask.copy()
    grown[12:14, 4:12] = 1                                  # 16 px expansion of 64 → 0.25
    report = mt.preservation_report(product, mask, product, generated_image=product, output_mask=grown)
    json.dumps(report)
    assert report["metrics"]["psnr_before_paste_back_db"] == "inf"
    assert report["metrics"]["expansion"] == {"pixels": 16, "ratio": 0.25}
    assert report["checks"]["delta_e2000_mean"]["pass"] and report["checks"]["psnr_before_paste_back_db"]["pass"]
    assert not report["checks"]["expansion_ratio"]["pass"] and report["pass"] is False
    lenient = mt.preservation_report(product, mask, product, output_mask=grown,
                                     thresholds=mt.Thresholds(max_expansion_ratio=0.3))
    assert lenient["pass"] is True and set(lenient["checks"]) == {"delta_e2000_mean", "expansion_ratio"}
