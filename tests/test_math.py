"""Property tests: every fold formula equals a direct float64 evaluation of producer-then-BatchNorm."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normswap._math import (batchnorm_reference, bn_affine, fold_bias, fold_conv_transpose_weight, fold_conv_weight,
                            fold_matrix_columns, per_channel_shape)


def conv_ref(x, w, b, group):
    """Grouped N-D convolution (cross-correlation), stride 1, no padding, float64."""
    n, c = x.shape[:2]
    m, cg = w.shape[:2]
    k = w.shape[2:]
    out_sp = tuple(s - kk + 1 for s, kk in zip(x.shape[2:], k))
    y = np.zeros((n, m) + out_sp)
    mg = m // group
    for off in np.ndindex(*k):
        sl = tuple(slice(o, o + s) for o, s in zip(off, out_sp))
        patch = x[(slice(None), slice(None)) + sl]
        for g in range(group):
            wg = w[(slice(g * mg, (g + 1) * mg), slice(None)) + tuple(off)]
            y[:, g * mg:(g + 1) * mg] += np.einsum("nc...,mc->nm...", patch[:, g * cg:(g + 1) * cg], wg)
    return y + (0 if b is None else b.reshape((1, -1) + (1,) * len(k)))


def conv_transpose_ref(x, w, b, group):
    """Grouped N-D transposed convolution, stride 1, no padding, float64 (scatter form)."""
    n, c = x.shape[:2]
    cg, mg = c // group, w.shape[1]
    k = w.shape[2:]
    out_sp = tuple(s + kk - 1 for s, kk in zip(x.shape[2:], k))
    y = np.zeros((n, mg * group) + out_sp)
    for off in np.ndindex(*k):
        sl = tuple(slice(o, o + s) for o, s in zip(off, x.shape[2:]))
        for g in range(group):
            wg = w[(slice(g * cg, (g + 1) * cg), slice(None)) + tuple(off)]
            contrib = np.einsum("nc...,cm->nm...", x[:, g * cg:(g + 1) * cg], wg)
            y[(slice(None), slice(g * mg, (g + 1) * mg)) + sl] += contrib
    return y + (0 if b is None else b.reshape((1, -1) + (1,) * len(k)))


params = st.fixed_dictionaries({
    "dims": st.integers(1, 3), "group": st.sampled_from([1, 2, 3]), "cin_per_group": st.integers(1, 3),
    "cout_per_group": st.integers(1, 3), "k": st.integers(1, 3), "bias": st.booleans(),
    "eps": st.sampled_from([1e-5, 1e-3, 0.1]), "seed": st.integers(0, 2**16),
    "dtype": st.sampled_from([np.float64, np.float32, np.float16]),
})


def _bn(rng, c, dtype):
    return (rng.uniform(0.2, 2, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype),
            rng.uniform(-2, 2, c).astype(dtype), rng.uniform(0.1, 3, c).astype(dtype))


def _tol(dtype):
    return {np.float64: 1e-10, np.float32: 1e-5, np.float16: 2e-3}[dtype]


@settings(max_examples=60, deadline=None)
@given(params)
def test_conv_fold_equals_conv_then_bn(p):
    rng = np.random.default_rng(p["seed"])
    g, cin, cout = p["group"], p["group"] * p["cin_per_group"], p["group"] * p["cout_per_group"]
    x = rng.standard_normal((2, cin) + (p["k"] + 2,) * p["dims"])
    w = rng.standard_normal((cout, cin // g) + (p["k"],) * p["dims"]).astype(p["dtype"])
    b = rng.standard_normal(cout).astype(p["dtype"]) if p["bias"] else None
    bn = _bn(rng, cout, p["dtype"])
    expected = batchnorm_reference(conv_ref(x, w.astype(np.float64), None if b is None else b.astype(np.float64), g),
                                   *bn, p["eps"])
    s, t = bn_affine(*bn, p["eps"])
    w2 = fold_conv_weight(w, s).astype(p["dtype"])  # cast once, like the rule does
    b2 = fold_bias(b, s, t).astype(p["dtype"])
    got = conv_ref(x, w2.astype(np.float64), b2.astype(np.float64), g)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=_tol(p["dtype"]) * scale * 10)


@settings(max_examples=60, deadline=None)
@given(params)
def test_conv_transpose_fold_equals_conv_transpose_then_bn(p):
    rng = np.random.default_rng(p["seed"])
    g, cin, cout = p["group"], p["group"] * p["cin_per_group"], p["group"] * p["cout_per_group"]
    x = rng.standard_normal((2, cin) + (3,) * p["dims"])
    w = rng.standard_normal((cin, cout // g) + (p["k"],) * p["dims"]).astype(p["dtype"])
    b = rng.standard_normal(cout).astype(p["dtype"]) if p["bias"] else None
    bn = _bn(rng, cout, p["dtype"])
    expected = batchnorm_reference(
        conv_transpose_ref(x, w.astype(np.float64), None if b is None else b.astype(np.float64), g), *bn, p["eps"])
    s, t = bn_affine(*bn, p["eps"])
    w2 = fold_conv_transpose_weight(w, s, g).astype(p["dtype"])
    b2 = fold_bias(b, s, t).astype(p["dtype"])
    got = conv_transpose_ref(x, w2.astype(np.float64), b2.astype(np.float64), g)
    np.testing.assert_allclose(got, expected, atol=_tol(p["dtype"]) * np.abs(expected).max() * 10)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2**16),
       st.sampled_from([1e-5, 0.01]))
def test_matrix_fold_equals_matmul_then_bn(k, n, transposed, bias, seed, eps):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((3, k))
    w = rng.standard_normal((n, k) if transposed else (k, n))
    b = rng.standard_normal(n) if bias else None
    bn = _bn(rng, n, np.float64)
    y = a @ (w.T if transposed else w) + (0 if b is None else b)
    expected = batchnorm_reference(y, *bn, eps)
    s, t = bn_affine(*bn, eps)
    w2 = fold_matrix_columns(w, s, transposed)
    got = a @ (w2.T if transposed else w2) + fold_bias(b, s, t)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(1, 8), st.integers(0, 2**16))
def test_affine_shape_broadcasts_per_channel(rank, c, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, c) + (3,) * (rank - 2))
    bn = _bn(rng, c, np.float64)
    s, t = bn_affine(*bn, 1e-5)
    shape = per_channel_shape(c, rank)
    np.testing.assert_allclose(x * s.reshape(shape) + t.reshape(shape), batchnorm_reference(x, *bn, 1e-5),
                               rtol=1e-12, atol=1e-12)


def test_conv_transpose_fold_scales_axis_1_per_group():
    # regressions: scaling axis 0 (ultralytics#25364) and ignoring groups (pytorch#180995)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 2, 2))  # C_in=4, group=2 -> M = 4, output channel g*2 + j
    s = rng.uniform(0.5, 2, 4)
    got = fold_conv_transpose_weight(w, s, 2)
    expected = w.copy()
    for i in range(4):
        for j in range(2):
            expected[i, j] *= s[(i // 2) * 2 + j]
    np.testing.assert_allclose(got, expected)
    assert not np.allclose(got, w * s.reshape(4, 1, 1, 1))  # the axis-0 bug
    assert not np.allclose(got[2:], w[2:] * s[:2].reshape(1, 2, 1, 1))  # the ignored-group bug


# ---- replacement norms ----------------------------------------------------------------------------------------
from normswap._math import (AffineFit, allowed_groups, choose_groups, group_normalize,  # noqa: E402
                            pick_groups_by_fit, ridge_solve)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**16))
def test_streaming_affine_fit_equals_per_channel_least_squares(channels, batches, rows, seed):
    rng = np.random.default_rng(seed)
    zs = [rng.standard_normal((rows, channels, 3)) for _ in range(batches)]
    ys = [2.0 * z + rng.standard_normal(z.shape) * 0.1 + 1.0 for z in zs]
    fit = AffineFit(channels)
    for z, y in zip(zs, ys):
        fit.add(z, y)
    a, b, sse = fit.solve()
    z_all = np.concatenate(zs).transpose(1, 0, 2).reshape(channels, -1)
    y_all = np.concatenate(ys).transpose(1, 0, 2).reshape(channels, -1)
    for c in range(channels):
        if np.ptp(z_all[c]) == 0:
            continue
        slope, intercept = np.polyfit(z_all[c], y_all[c], 1)
        assert a[c] == pytest.approx(slope, rel=1e-6, abs=1e-9)
        assert b[c] == pytest.approx(intercept, rel=1e-6, abs=1e-9)
        assert sse[c] == pytest.approx(np.sum((y_all[c] - slope * z_all[c] - intercept) ** 2), rel=1e-6, abs=1e-8)


def test_affine_fit_of_a_constant_channel_is_its_mean():
    fit = AffineFit(1)
    fit.add(np.ones((4, 1)), np.arange(4.0).reshape(4, 1))
    a, b, _ = fit.solve()
    assert a[0] == 0 and b[0] == pytest.approx(1.5)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 64), st.integers(1, 64), st.integers(1, 32))
def test_chosen_groups_divide_channels_and_are_large_enough(channels, spatial, groups, min_elements):
    g, how = choose_groups(channels, spatial, groups=groups, min_elements=min_elements)
    allowed = allowed_groups(channels, spatial, groups, min_elements)
    if g is None:
        assert not allowed
    else:
        assert channels % g == 0 and g <= groups and (channels // g) * spatial >= min_elements
        assert g == max(allowed)  # the largest allowed count
    with pytest.raises(ValueError):
        choose_groups(channels, spatial)


def test_group_size_and_degenerate_nc_input():
    assert choose_groups(64, 1, group_size=16)[0] == 4
    assert choose_groups(64, 1, groups=32)[0] == 4  # (N, C): 2 values per group would be degenerate
    assert choose_groups(8, 1, groups=8)[0] is None


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([1, 2, 4]))
def test_group_normalize_special_cases(seed, groups):
    x = np.random.default_rng(seed).standard_normal((2, 4, 3, 3)) * 5 + 100
    z = group_normalize(x, groups, 1e-5)
    r = z.reshape(2, groups, -1)
    np.testing.assert_allclose(r.mean(-1), 0, atol=1e-9)
    np.testing.assert_allclose(r.var(-1), 1, atol=1e-5)  # up to eps


def test_pick_groups_by_fit_prefers_more_groups_within_slack():
    assert pick_groups_by_fit({1: 100.0, 2: 101.0, 4: 150.0}) == 2
    assert pick_groups_by_fit({1: 100.0, 2: 110.0}) == 1


def test_ridge_solve_is_least_squares_for_small_ridge():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((50, 3))
    w = rng.standard_normal((3, 2))
    np.testing.assert_allclose(ridge_solve(h.T @ h, h.T @ (h @ w), 1e-12), w, rtol=1e-6)


@settings(max_examples=60, deadline=None, derandomize=True)  # the same examples in every CI run
@given(seed=st.integers(0, 10_000), groups_log=st.integers(0, 2), spatial=st.integers(2, 6),
       offset=st.floats(-100, 100), centred=st.booleans())
def test_group_fit_sums_equal_sums_of_the_normalized_input(seed, groups_log, spatial, offset, centred):
    """The moment algebra gives the same fit sums as normalizing x explicitly (float64), for every group
    count, with or without a per-channel shift taken before the moments. Groups hold at least 8 values, as
    calibration's do (``MIN_GROUP_ELEMENTS``): a group of two values is too ill-conditioned to compare."""
    from normswap._math import AffineFit, group_fit_sums, group_normalize
    rng = np.random.default_rng(seed)
    c, groups = 8, 2 ** groups_log
    x = rng.standard_normal((5, c, spatial, spatial)) * rng.uniform(0.1, 3, (1, c, 1, 1)) + offset
    y = rng.standard_normal((5, c, spatial, spatial)) + x
    direct = AffineFit(c)
    direct.add(group_normalize(x, groups, 1e-5), y)
    shift = rng.uniform(-100, 100, c) if centred else np.zeros(c)
    xr = x.reshape(5, c, -1) - shift[None, :, None]
    yr = y.reshape(5, c, -1)
    moments = AffineFit(c)
    moments.add_sums(5 * spatial * spatial, *group_fit_sums(xr.sum(2), (xr * xr).sum(2), (xr * yr).sum(2),
                                                            yr.sum(2), (yr * yr).sum(2), spatial * spatial, groups,
                                                            1e-5, shift if centred else None))
    for a, b, rtol in zip(direct.solve(), moments.solve(), (1e-5, 1e-5, 1e-4)):  # (a, b, sse: cancels more)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(a).max())))


def test_a_group_constant_within_each_sample_normalizes_to_zero():
    from normswap._math import group_fit_sums
    x = np.repeat(np.arange(1.0, 4.0)[:, None, None], 4, axis=2).reshape(3, 1, 4) * np.ones((3, 2, 4))
    y = np.random.default_rng(0).standard_normal((3, 2, 4))
    shift = np.full(2, 0.3)  # the moments of x - 0.3, as calibration takes them, sum x^2 off by float32 rounding
    xc = x - 0.3
    sums = (xc.sum(2), (xc * xc).sum(2) * (1 + 1e-7), (xc * y).sum(2), y.sum(2), (y * y).sum(2))
    sz, szz, _, _, szy = group_fit_sums(*sums, 4, 1, 1e-5, shift, precision=1e-6)
    assert not sz.any() and not szz.any() and not szy.any()
    noisy = group_fit_sums(*sums, 4, 1, 1e-5, shift)  # exact sums assumed: the rounding is normalized up as signal
    assert noisy[1].max() > 1e-3
    varied = x + np.random.default_rng(1).standard_normal(x.shape)  # not constant: z carries the signal
    sz, szz, _, _, _ = group_fit_sums(varied.sum(2), (varied * varied).sum(2), (varied * y).sum(2), y.sum(2),
                                      (y * y).sum(2), 4, 1, 1e-5)
    assert szz.min() > 1
