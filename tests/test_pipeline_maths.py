"""The pipeline's pure maths: DALI's crop placement, PCA lighting, normalisation, samples split over ranks."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.augment import TENCROP_VIEWS, crop_anchor, crop_window, lighting_offset, normalisation
from pipeline.sharding import dali_seeds, rank_range, steps_per_epoch, valid_in_step


def test_crop_anchor_follows_dalis_rounding():
    assert crop_anchor(0.0, 256, 224) == 0
    assert crop_anchor(1.0, 256, 224) == 32
    assert crop_anchor(0.5, 81, 64) == 9  # 8.5 rounds away from zero, not to even
    assert crop_anchor(0.5, 83, 64) == 10  # 9.5 likewise
    assert crop_anchor(0.3, 69, 64) == 2  # float32(0.3) * 5 = 1.5000000596, as DALI computes it
    assert crop_anchor(0.7, 64, 64) == 0  # a crop as large as the image has one place


def test_crop_window_is_rows_then_columns():
    rows, cols = crop_window(pos_x=1.0, pos_y=0.0, height=100, width=120, crop=64)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 64, 56, 120)


def test_tencrop_views_are_corners_and_centre_then_mirrored():
    assert len(TENCROP_VIEWS) == 10
    places = {(x, y) for x, y, _ in TENCROP_VIEWS}
    assert places == {(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)}
    assert [m for *_, m in TENCROP_VIEWS] == [0] * 5 + [1] * 5
    assert [v[:2] for v in TENCROP_VIEWS[:5]] == [v[:2] for v in TENCROP_VIEWS[5:]]


def test_lighting_offset_is_the_papers_sum():
    rng = np.random.default_rng(0)
    eigvec, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    eigval = np.array([0.2, 0.05, 0.01])
    alpha = np.array([0.3, -1.2, 0.7])
    # §4.1: add sum_i alpha_i lambda_i p_i, p_i the i-th column; pixels in 0-255 units.
    want = 255 * sum(alpha[i] * eigval[i] * eigvec[:, i] for i in range(3))
    np.testing.assert_allclose(lighting_offset(alpha, eigval, eigvec), want, rtol=1e-12)
    assert not np.allclose(lighting_offset(alpha, eigval, eigvec.T), want)  # rows would be the wrong convention


def test_normalisation_divides_by_std_only_when_asked():
    mean, std = normalisation([120.0, 110.0, 100.0], [60.0, 55.0, 50.0], divide_std=True)
    np.testing.assert_array_equal(std, [60.0, 55.0, 50.0])
    mean, std = normalisation([120.0, 110.0, 100.0], [60.0, 55.0, 50.0], divide_std=False)
    np.testing.assert_array_equal(mean, [120.0, 110.0, 100.0])
    np.testing.assert_array_equal(std, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("count,world,batch", [(96, 1, 7), (96, 2, 7), (96, 3, 7), (37, 3, 8), (24, 5, 5), (10, 4, 1)])
def test_ranks_split_the_samples_exactly_once(count, world, batch):
    ranges = [rank_range(count, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    steps = steps_per_epoch(count, batch, world)
    assert all(stop - start <= steps * batch for start, stop in ranges)
    assert (steps - 1) * batch < max(stop - start for start, stop in ranges)  # no step is padding on every rank
    valid = [[valid_in_step(count, r, world, batch, s) for s in range(steps)] for r in range(world)]
    assert sum(map(sum, valid)) == count
    assert [sum(v) for v in valid] == [stop - start for start, stop in ranges]


def test_dali_seeds_share_the_reader_and_split_the_draws():
    seeds = [dali_seeds(seed, rank) for seed in range(3) for rank in range(4)]
    assert all(0 <= s < 2**31 for pair in seeds for s in pair)
    assert len({reader for reader, _ in seeds[:4]}) == 1  # one file order for every rank of a run
    assert len({reader for reader, _ in seeds}) == 3 and len({draws for _, draws in seeds}) == 12
    # A resumed run is another process: its seeds must not hang on anything of the process (hash seed, time, pid).
    fresh = subprocess.run(
        [sys.executable, "-c", "from pipeline.sharding import dali_seeds; print(dali_seeds(7, 2))"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "1"},
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert fresh.strip() == str(dali_seeds(7, 2)) == "(1201125462, 2032283795)"  # as saved positions were drawn
