"""Math/consistency tests for ssl_repsim, checked against independent float64 references.

Every reference here is written from the published formulas (Kornblith et al. 2019 gram_linear / gram_rbf /
center_gram, Szekely-Rizzo U-centring, Song et al. 2012 unbiased HSIC_1, Nguyen et al. 2021 minibatch CKA,
DINO's weighted k-NN, timm's ViT block) and never calls the module under test for the expected value.
Test names start with ``test_math_``, helpers with ``_m_``.
"""
import math

import numpy as np
import pytest
import torch

import ssl_repsim as sr


# ---------------------------------------------------------------------------------------------------------------
# independent float64 references (numpy)
# ---------------------------------------------------------------------------------------------------------------

def _m_np(x):
    """Tensor/array -> float64 numpy array, flattened to (n, -1)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def _m_gram_linear(x):
    x = _m_np(x)
    return x @ x.T


def _m_sq_dists(x):
    x = _m_np(x)
    sq = np.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


def _m_gram_rbf(x, threshold=1.0, median="kornblith"):
    """Kornblith et al. gram_rbf: K = exp(-d^2 / (2 * threshold^2 * median(d^2))).

    median="kornblith": np.median over the full n x n matrix (diagonal zeros included), as in Demo.ipynb.
    Other variants are only used to diagnose which convention the module follows when it disagrees.
    """
    d2 = _m_sq_dists(x)
    n = d2.shape[0]
    if median == "kornblith":
        med = np.median(d2)
    elif median == "offdiag":
        med = np.median(d2[~np.eye(n, dtype=bool)])
    elif median == "torch_lower":  # torch.median returns the lower of the two middle values
        v = np.sort(d2.ravel())
        med = v[(v.size - 1) // 2]
    elif median == "offdiag_torch_lower":
        v = np.sort(d2[~np.eye(n, dtype=bool)])
        med = v[(v.size - 1) // 2]
    else:
        raise ValueError(median)
    return np.exp(-d2 / (2.0 * threshold ** 2 * med))


def _m_center_biased(k):
    """H K H with H = I - 11'/n."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ k @ h


def _m_center_unbiased(k):
    """Szekely-Rizzo U-centring: zero diagonal, then
    U_ij = K_ij - r_i/(n-2) - r_j/(n-2) + S/((n-1)(n-2)) for i != j, U_ii = 0."""
    n = k.shape[0]
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    r = k.sum(axis=1)
    s = k.sum()
    u = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + s / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def _m_cka_from_grams(k, l, debiased=False):
    c = _m_center_unbiased if debiased else _m_center_biased
    kc, lc = c(k), c(l)
    return float(np.sum(kc * lc) / (np.linalg.norm(kc) * np.linalg.norm(lc)))


def _m_gram(x, kernel, threshold, median="kornblith"):
    return _m_gram_linear(x) if kernel == "linear" else _m_gram_rbf(x, threshold, median)


def _m_cka(x, y, kernel="linear", debiased=False, threshold=1.0, median="kornblith"):
    return _m_cka_from_grams(_m_gram(x, kernel, threshold, median), _m_gram(y, kernel, threshold, median), debiased)


def _m_cka_feature_linear(x, y):
    """Feature-space linear CKA, column-centred in float64: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F)."""
    x = _m_np(x)
    y = _m_np(y)
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _m_hsic1(k, l):
    """Song et al. 2012 unbiased HSIC_1, with K~, L~ = K, L with zeroed diagonal:
    [tr(K~L~) + 1'K~1 1'L~1/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    kt = k.copy()
    lt = l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def _m_minibatch_cka(batches_a, batches_b):
    """Nguyen et al. 2021: sum_b HSIC1(K_b, L_b) / sqrt(sum_b HSIC1(K_b,K_b) * sum_b HSIC1(L_b,L_b)).

    batches_a: list over minibatches of lists over layers of (b, d) arrays; same for batches_b."""
    na, nb = len(batches_a[0]), len(batches_b[0])
    xy = np.zeros((na, nb))
    xx = np.zeros(na)
    yy = np.zeros(nb)
    for xs, ys in zip(batches_a, batches_b):
        ks = [_m_gram_linear(x) for x in xs]
        ls = [_m_gram_linear(y) for y in ys]
        for i, k in enumerate(ks):
            xx[i] += _m_hsic1(k, k)
            for j, l in enumerate(ls):
                xy[i, j] += _m_hsic1(k, l)
        for j, l in enumerate(ls):
            yy[j] += _m_hsic1(l, l)
    return xy / np.sqrt(xx[:, None] * yy[None, :])


def _m_layers(n, widths, seed, latent=6, noise=0.5):
    """Correlated synthetic layers: nonlinear maps of a shared latent plus layer-specific noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, generator=g, dtype=torch.float64)
    out = []
    for i, w in enumerate(widths):
        a = torch.randn(latent, w, generator=g, dtype=torch.float64)
        h = torch.tanh(z @ a / math.sqrt(latent)) * (1.0 + i) + noise * torch.randn(n, w, generator=g, dtype=torch.float64)
        h = h + 0.3 * torch.randn(1, w, generator=g, dtype=torch.float64)  # a nonzero mean per layer
        out.append(h.float())
    return out


def _m_as_matrix(m):
    if isinstance(m, torch.Tensor):
        return m.detach().cpu().double().numpy()
    return np.asarray(m, dtype=np.float64)


def _m_rbf_diagnosis(xs, ys, got, debiased, threshold):
    """When an RBF map disagrees, say which median convention it matches (for the failure message)."""
    lines = []
    for variant in ("kornblith", "offdiag", "torch_lower", "offdiag_torch_lower"):
        ref = np.array([[_m_cka(x, y, "rbf", debiased, threshold, variant) for y in ys] for x in xs])
        lines.append(f"{variant}: max|diff|={np.max(np.abs(ref - got)):.3g}")
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# 0. the references agree with each other (guards the test code itself)
# ---------------------------------------------------------------------------------------------------------------

def test_math_reference_self_consistency():
    x, y = _m_layers(30, [12, 20], seed=0)
    # feature-space linear CKA == Gram-space linear CKA
    assert abs(_m_cka_feature_linear(x, y) - _m_cka(x, y)) < 1e-12
    # single-batch minibatch CKA (Song HSIC_1) == debiased CKA (U-centring)
    mb = _m_minibatch_cka([[_m_np(x)]], [[_m_np(y)]])[0, 0]
    assert abs(mb - _m_cka(x, y, debiased=True)) < 1e-12
    # HSIC_1 == <U(K), U(L)> / (n(n-3))
    k, l = _m_gram_linear(x), _m_gram_linear(y)
    n = k.shape[0]
    assert abs(_m_hsic1(k, l) - np.sum(_m_center_unbiased(k) * _m_center_unbiased(l)) / (n * (n - 3))) < 1e-6 * abs(
        _m_hsic1(k, l))


# ---------------------------------------------------------------------------------------------------------------
# 1. CKA
# ---------------------------------------------------------------------------------------------------------------

_M_ESTIMATORS = [
    ("linear", False, 1.0),
    ("linear", True, 1.0),
    ("rbf", False, 0.5),
    ("rbf", False, 1.0),
    ("rbf", True, 1.0),
]
# (n, widths of xs, widths of ys): n < d exercises the Gram path, n > d the feature path
_M_REGIMES = [
    (24, [40, 64, 100], [32, 48, 80, 128]),
    (150, [5, 8, 12], [6, 10, 16, 20]),
]


@pytest.mark.parametrize("kernel,debiased,threshold", _M_ESTIMATORS)
@pytest.mark.parametrize("regime", [0, 1], ids=["n_lt_d", "n_gt_d"])
def test_math_cka_scalar_matches_reference(kernel, debiased, threshold, regime):
    n, wa, wb = _M_REGIMES[regime]
    xs = _m_layers(n, wa, seed=1)
    ys = _m_layers(n, wb, seed=2)
    for x in xs[:2]:
        for y in ys[:2]:
            got = sr.cka(x, y, kernel=kernel, debiased=debiased, rbf_threshold=threshold)
            ref = _m_cka(x, y, kernel, debiased, threshold)
            assert isinstance(got, float), type(got)
            assert abs(got - ref) < 1e-4, (kernel, debiased, threshold, n, x.shape, y.shape, got, ref)


@pytest.mark.parametrize("kernel,debiased,threshold", _M_ESTIMATORS)
@pytest.mark.parametrize("regime", [0, 1], ids=["n_lt_d", "n_gt_d"])
@pytest.mark.parametrize("container", ["list", "dict"])
def test_math_cka_matrix_matches_reference(kernel, debiased, threshold, regime, container):
    n, wa, wb = _M_REGIMES[regime]
    xs = _m_layers(n, wa, seed=3)
    ys = _m_layers(n, wb, seed=4)
    ref = np.array([[_m_cka(x, y, kernel, debiased, threshold) for y in ys] for x in xs])
    if container == "dict":
        a = {f"a{i}": x for i, x in enumerate(xs)}
        b = {f"b{j}": y for j, y in enumerate(ys)}
    else:
        a, b = xs, ys
    m = sr.cka_matrix(a, b, kernel=kernel, debiased=debiased, rbf_threshold=threshold)
    assert isinstance(m, torch.Tensor)
    assert tuple(m.shape) == (len(xs), len(ys))
    assert m.dtype == torch.float64
    got = _m_as_matrix(m)
    err = np.max(np.abs(got - ref))
    msg = f"{kernel} debiased={debiased} t={threshold} n={n}: max|diff|={err:.3g}\ngot={got}\nref={ref}"
    if kernel == "rbf" and err >= 1e-4:
        msg += "\n" + _m_rbf_diagnosis(xs, ys, got, debiased, threshold)
    assert err < 1e-4, msg


def test_math_cka_flattens_higher_dim_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 4, 6, generator=g)
    y = torch.tanh(x.reshape(20, -1) @ torch.randn(24, 10, generator=g)).reshape(20, 2, 5)
    assert abs(sr.cka(x, y) - _m_cka(x, y)) < 1e-4


def test_math_cka_matrix_self_is_symmetric_with_unit_diagonal():
    xs = _m_layers(40, [10, 30, 70], seed=6)
    m = _m_as_matrix(sr.cka_matrix(xs, xs))
    assert np.allclose(np.diag(m), 1.0, atol=1e-5), np.diag(m)
    assert np.allclose(m, m.T, atol=1e-6)


@pytest.mark.parametrize("kernel,debiased", [("linear", False), ("linear", True), ("rbf", False)])
@pytest.mark.parametrize("n,d", [(30, 50), (200, 12)])
def test_math_cka_invariances(kernel, debiased, n, d):
    """CKA(x, x) = 1; isotropic scaling and an orthogonal transform leave CKA unchanged."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)) + 0.3 * torch.randn(
        n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x, y, xt = x.float(), y.float(), (3.7 * x @ q).float()
    assert abs(sr.cka(x, x, kernel=kernel, debiased=debiased) - 1.0) < 1e-5
    base = sr.cka(x, y, kernel=kernel, debiased=debiased)
    assert abs(base - _m_cka(x, y, kernel, debiased)) < 1e-4
    assert abs(sr.cka(xt, y, kernel=kernel, debiased=debiased) - base) < 1e-5
    assert abs(sr.cka(x, 0.01 * y, kernel=kernel, debiased=debiased) - base) < 1e-5


@pytest.mark.parametrize("n,d", [(20, 40), (120, 8)], ids=["gram", "feature"])
@pytest.mark.parametrize("debiased", [False, True])
def test_math_cka_matrix_constant_layer_nan_and_warns(n, d, debiased):
    xs = _m_layers(n, [d, d + 3, d + 5], seed=8)
    ys = _m_layers(n, [d + 1, d + 2], seed=9)
    a = {"xa": xs[0], "const_x_layer": torch.full((n, d), 3.0), "xc": xs[2]}
    b = {"yb": ys[0], "yc": ys[1], "const_y_layer": torch.ones(n, d + 4)}
    with pytest.warns(Warning) as rec:
        m = sr.cka_matrix(a, b, debiased=debiased)
    text = " ".join(str(w.message) for w in rec)
    assert "const_x_layer" in text and "const_y_layer" in text, text
    got = _m_as_matrix(m)
    assert got.shape == (3, 3)
    nan = np.isnan(got)
    expected_nan = np.zeros((3, 3), dtype=bool)
    expected_nan[1, :] = True
    expected_nan[:, 2] = True
    assert (nan == expected_nan).all(), got
    for i, x in ((0, xs[0]), (2, xs[2])):
        for j, y in ((0, ys[0]), (1, ys[1])):
            assert abs(got[i, j] - _m_cka(x, y, "linear", debiased)) < 1e-4


@pytest.mark.parametrize("offset_path", ["feature", "gram"])
def test_math_cka_matrix_float32_drift_with_large_mean(offset_path):
    """Features with a large shared mean (offset 100) must not lose precision in float32."""
    if offset_path == "feature":
        n, widths_a, widths_b = 3000, [64, 64], [64, 64, 64]
    else:
        n, widths_a, widths_b = 300, [600, 700], [650]
    g = torch.Generator().manual_seed(10)
    z = torch.randn(n, 16, generator=g, dtype=torch.float64)

    def layer(w):
        # per-coordinate std ~1 around a shared mean of 100: uncentred float32 products lose ~1e-4 here
        h = 0.7 * z @ torch.randn(16, w, generator=g, dtype=torch.float64) / 4.0 + 0.7 * torch.randn(
            n, w, generator=g, dtype=torch.float64)
        return (h + 100.0).float()

    xs = [layer(w) for w in widths_a]
    ys = [layer(w) for w in widths_b]
    ref = np.array([[_m_cka_feature_linear(x, y) for y in ys] for x in xs])
    got = _m_as_matrix(sr.cka_matrix(xs, ys))
    assert np.max(np.abs(got - ref)) < 1e-5, (got, ref)


def _m_mb_data(batch_sizes, wa, wb, seed):
    batches_a, batches_b = [], []
    for t, b in enumerate(batch_sizes):
        batches_a.append(_m_layers(b, wa, seed=seed + 2 * t))
        # y layers share the latent of x (same seed) so the CKA is far from 0
        ys = _m_layers(b, wb, seed=seed + 2 * t, noise=1.0)
        batches_b.append([y + 0.2 * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + t))
                          for y in ys])
    return batches_a, batches_b


@pytest.mark.parametrize("batch_sizes", [[16, 16, 16, 16, 16], [32, 16, 8, 5]], ids=["equal", "varying"])
def test_math_minibatch_cka_matches_reference(batch_sizes):
    wa, wb = [12, 30, 7], [9, 40]
    batches_a, batches_b = _m_mb_data(batch_sizes, wa, wb, seed=11)
    acc = sr.MinibatchCKA(len(wa), len(wb))
    for xs, ys in zip(batches_a, batches_b):
        acc.update(xs, ys)
    got = _m_as_matrix(acc.compute())
    ref = _m_minibatch_cka([[_m_np(x) for x in xs] for xs in batches_a],
                           [[_m_np(y) for y in ys] for ys in batches_b])
    assert got.shape == (len(wa), len(wb))
    assert np.max(np.abs(got - ref)) < 1e-4, (got, ref)


def test_math_minibatch_cka_single_batch_equals_debiased_cka():
    xs = _m_layers(40, [10, 25], seed=12)
    ys = _m_layers(40, [15], seed=13)
    acc = sr.MinibatchCKA(2, 1)
    acc.update(xs, ys)
    got = _m_as_matrix(acc.compute())
    for i, x in enumerate(xs):
        assert abs(got[i, 0] - _m_cka(x, ys[0], debiased=True)) < 1e-4


@pytest.mark.parametrize("b", [2, 3])
def test_math_minibatch_cka_rejects_small_batches(b):
    xs = _m_layers(b, [5], seed=14)
    ys = _m_layers(b, [6], seed=15)
    acc = sr.MinibatchCKA(1, 1)
    with pytest.raises((sr.UsageError, ValueError)):
        acc.update(xs, ys)
        acc.compute()


# ---------------------------------------------------------------------------------------------------------------
# 2. extraction consistency on a tiny random ViT, against the block math written out by hand
# ---------------------------------------------------------------------------------------------------------------

_M_CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_hidden=64)
_M_SUBLAYERS = ["norm1", "attn", "attn.qkv", "attn.proj", "norm2", "mlp", "mlp.fc1", "mlp.act", "mlp.fc2"]


def _m_model(seed=0, **extra):
    """Random tiny ViT, parameters perturbed so LayerNorm / layer-scale weights are not 1 and biases not 0."""
    torch.manual_seed(seed)
    model = sr.ViT(sr.ViTConfig(**_M_CFG, **extra))
    g = torch.Generator().manual_seed(seed + 100)
    norm_weights = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
                    if isinstance(mod, torch.nn.LayerNorm)}
    sd = {k: v for k, v in model.state_dict().items()}
    ls_keys = set()
    for i in range(model.cfg.depth):
        ls_keys.update(_m_layer_scales(sd, i, model.cfg.embed_dim))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in norm_weights or name in ls_keys:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def _m_images(n=5, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _m_extract(model, x, points, tokens="all", **kw):
    return sr.extract(model, x, points=points, tokens=tokens, device="cpu", **kw)


def _m_sd(model):
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def _m_layer_scales(sd, i, dim):
    """Layer-scale vectors of block i: 1-D params of size dim outside norm1/attn/norm2/mlp, sorted by name."""
    pre = f"blocks.{i}."
    own = ("norm1.", "attn.", "norm2.", "mlp.")
    keys = sorted(k for k, v in sd.items() if k.startswith(pre) and not k[len(pre):].startswith(own)
                  and v.numel() == dim)
    return keys


def _m_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _m_linear(x, sd, prefix):
    y = x @ sd[prefix + ".weight"].T
    if prefix + ".bias" in sd:
        y = y + sd[prefix + ".bias"]
    return y


def _m_gelu_erf(x):
    return 0.5 * x * (1.0 + torch.special.erf(x / math.sqrt(2.0)))


def _m_block_by_hand(x, sd, i, heads, eps, layer_scale=False):
    """timm Block: x + g1*proj(attn(norm1(x))); then + g2*fc2(gelu(fc1(norm2(.)))). Returns dict of intermediates."""
    p = f"blocks.{i}"
    n, t, c = x.shape
    hd = c // heads
    out = {}
    g1 = g2 = 1.0
    if layer_scale:
        ls = _m_layer_scales(sd, i, c)
        assert len(ls) == 2, f"expected two layer-scale vectors in block {i}, found {ls}"
        g1, g2 = sd[ls[0]], sd[ls[1]]
    h = _m_layer_norm(x, sd[p + ".norm1.weight"], sd[p + ".norm1.bias"], eps)
    out["norm1"] = h
    qkv = _m_linear(h, sd, p + ".attn.qkv")
    out["attn.qkv"] = qkv
    qkv = qkv.reshape(n, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
    o = (a @ v).transpose(1, 2).reshape(n, t, c)
    o = _m_linear(o, sd, p + ".attn.proj")
    out["attn.proj"] = out["attn"] = o
    r = x + g1 * o
    out["attn_residual"] = r
    h2 = _m_layer_norm(r, sd[p + ".norm2.weight"], sd[p + ".norm2.bias"], eps)
    out["norm2"] = h2
    f1 = _m_linear(h2, sd, p + ".mlp.fc1")
    out["mlp.fc1"] = f1
    act = _m_gelu_erf(f1)
    out["mlp.act"] = act
    f2 = _m_linear(act, sd, p + ".mlp.fc2")
    out["mlp.fc2"] = out["mlp"] = f2
    out["out"] = r + g2 * f2
    return out


def _m_close(got, ref, atol=1e-4, what=""):
    got = got.double()
    ref = ref.double()
    assert got.shape == ref.shape, (what, tuple(got.shape), tuple(ref.shape))
    err = (got - ref).abs().max().item()
    assert err < atol, f"{what}: max|diff|={err:.3g}"


def _m_check_blocks_by_hand(model, x, layer_scale=False):
    cfg = model.cfg
    points = ["embed", "norm"] + [f"blocks.{i}" for i in range(cfg.depth)] + [
        f"blocks.{i}.attn_residual" for i in range(cfg.depth)] + [
        f"blocks.{i}.{s}" for i in range(cfg.depth) for s in _M_SUBLAYERS]
    f = _m_extract(model, x, points)
    for k in points:
        assert f[k].dtype == torch.float32 and f[k].device.type == "cpu", k
    sd = _m_sd(model)
    h = f["embed"].double()
    for i in range(cfg.depth):
        # one block at a time from the extracted input (errors do not compound) ...
        step = _m_block_by_hand(f["embed"].double() if i == 0 else f[f"blocks.{i - 1}"].double(), sd, i,
                                cfg.num_heads, cfg.norm_eps, layer_scale)
        _m_close(f[f"blocks.{i}.attn_residual"], step["attn_residual"], what=f"blocks.{i}.attn_residual")
        _m_close(f[f"blocks.{i}"], step["out"], what=f"blocks.{i}")
        for s in _M_SUBLAYERS:
            _m_close(f[f"blocks.{i}.{s}"], step[s], what=f"blocks.{i}.{s}")
        # ... and the residual identities between extracted points
        prev = f["embed"] if i == 0 else f[f"blocks.{i - 1}"]
        if not layer_scale:
            _m_close(f[f"blocks.{i}.attn_residual"], prev + f[f"blocks.{i}.attn.proj"], atol=1e-5,
                     what=f"blocks.{i}.attn_residual == prev + attn.proj")
            _m_close(f[f"blocks.{i}"], f[f"blocks.{i}.attn_residual"] + f[f"blocks.{i}.mlp"], atol=1e-5,
                     what=f"blocks.{i} == attn_residual + mlp")
        # full chain from embed, all by hand
        h = _m_block_by_hand(h, sd, i, cfg.num_heads, cfg.norm_eps, layer_scale)["out"]
        _m_close(f[f"blocks.{i}"], h, atol=2e-4, what=f"chained blocks.{i}")
    hn = _m_layer_norm(h, sd["norm.weight"], sd["norm.bias"], cfg.norm_eps)
    _m_close(f["norm"], hn, atol=2e-4, what="norm by hand")
    with torch.no_grad():
        ff = model.forward_features(x)
    _m_close(f["norm"], ff, atol=1e-5, what="norm == forward_features")
    return f


def test_math_extract_blocks_match_hand_math():
    model = _m_model(0)
    x = _m_images(5)
    f = _m_check_blocks_by_hand(model, x)
    n_tok = 1 + (32 // 8) ** 2
    assert tuple(f["blocks.0"].shape) == (5, n_tok, 32)
    assert tuple(f["blocks.0.attn.qkv"].shape) == (5, n_tok, 96)
    assert tuple(f["blocks.1.mlp.fc1"].shape) == (5, n_tok, 64)
    with torch.no_grad():
        pooled = model(x)
    _m_close(pooled, f["norm"][:, 0], atol=1e-5, what="model(x) == cls after final norm")


def test_math_extract_embed_by_hand():
    model = _m_model(1)
    sd = _m_sd(model)
    needed = ["patch_embed.proj.weight", "cls_token", "pos_embed"]
    if not all(k in sd for k in needed):
        pytest.skip(f"state_dict does not use the timm names {needed}: {sorted(sd)[:8]}...")
    x = _m_images(3, seed=1)
    f = _m_extract(model, x, ["embed"])
    w = sd["patch_embed.proj.weight"]  # (C, 3, p, p)
    p = w.shape[-1]
    xd = x.double()
    n = x.shape[0]
    patches = xd.reshape(n, 3, 32 // p, p, 32 // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (32 // p) ** 2, -1)
    tok = patches @ w.reshape(w.shape[0], -1).T
    if "patch_embed.proj.bias" in sd:
        tok = tok + sd["patch_embed.proj.bias"]
    cls = sd["cls_token"].reshape(1, 1, -1).expand(n, 1, -1)
    ref = torch.cat([cls, tok], 1) + sd["pos_embed"].reshape(1, -1, w.shape[0])
    _m_close(f["embed"], ref, atol=1e-4, what="embed by hand")


def test_math_extract_token_reductions():
    model = _m_model(2)
    x = _m_images(5, seed=2)
    pts = ["blocks.0", "blocks.1", "norm"]
    a = _m_extract(model, x, pts, tokens="all")
    red = {t: _m_extract(model, x, pts, tokens=t) for t in ("flat", "cls", "mean", "patch")}
    for k in pts:
        n, t, c = a[k].shape
        assert set(red["flat"]) >= {k}
        _m_close(red["flat"][k], a[k].reshape(n, t * c), atol=1e-6, what=f"flat {k}")
        _m_close(red["cls"][k], a[k][:, 0], atol=1e-6, what=f"cls {k}")
        _m_close(red["mean"][k], a[k][:, 1:].mean(1), atol=1e-6, what=f"mean {k}")
        _m_close(red["patch"][k], a[k][:, 1:], atol=1e-6, what=f"patch {k}")


def test_math_extract_iterable_of_batches_equals_tensor():
    model = _m_model(3)
    x = _m_images(5, seed=3)
    pts = ["embed", "blocks.0", "blocks.1.attn_residual", "norm"]
    whole = _m_extract(model, x, pts)
    listed = _m_extract(model, [x[:3], x[3:]], pts)
    labelled = _m_extract(model, [(x[:3], torch.zeros(3, dtype=torch.long)), (x[3:], torch.ones(2, dtype=torch.long))],
                          pts)
    small = _m_extract(model, x, pts, batch_size=2)
    for k in pts:
        _m_close(listed[k], whole[k], atol=1e-5, what=f"list of batches {k}")
        _m_close(labelled[k], whole[k], atol=1e-5, what=f"(x, y) batches {k}")
        _m_close(small[k], whole[k], atol=1e-5, what=f"batch_size=2 {k}")


def test_math_extract_sublayer_point_names():
    model = _m_model(4)
    x = _m_images(2, seed=4)
    f = sr.extract(model, x, points="sublayers", device="cpu")
    expected = {f"blocks.{i}.{s}" for i in range(2) for s in _M_SUBLAYERS}
    assert expected <= set(f), sorted(expected - set(f))
    fb = sr.extract(model, x, points="blocks", device="cpu")
    assert {"blocks.0", "blocks.1"} <= set(fb), sorted(fb)
    fd = sr.extract(model, x, device="cpu")  # default: all blocks
    assert {"blocks.0", "blocks.1"} <= set(fd), sorted(fd)


def test_math_extract_layer_scale_model():
    model = _m_model(5, layer_scale=True)
    sd = _m_sd(model)
    for i in range(2):
        ls = _m_layer_scales(sd, i, 32)
        assert len(ls) == 2, f"block {i}: expected 2 layer-scale vectors, found {ls} in {sorted(sd)}"
        assert not torch.allclose(sd[ls[0]], torch.ones(32, dtype=torch.float64))
    x = _m_images(4, seed=5)
    _m_check_blocks_by_hand(model, x, layer_scale=True)


def test_math_extract_registers_model():
    model = _m_model(6, num_registers=2)
    x = _m_images(4, seed=6)
    f = _m_check_blocks_by_hand(model, x)
    pts = ["blocks.1", "norm"]
    a = _m_extract(model, x, pts)
    mean = _m_extract(model, x, pts, tokens="mean")
    cls = _m_extract(model, x, pts, tokens="cls")
    patch = _m_extract(model, x, pts, tokens="patch")
    for k in pts:
        assert a[k].shape[1] == 1 + 2 + 16, a[k].shape
        _m_close(mean[k], a[k][:, 3:].mean(1), atol=1e-6, what=f"mean excludes cls+registers {k}")
        _m_close(cls[k], a[k][:, 0], atol=1e-6, what=f"cls {k}")
        _m_close(patch[k], a[k][:, 3:], atol=1e-6, what=f"patch {k}")
    assert f["norm"].shape[1] == 19


# ---------------------------------------------------------------------------------------------------------------
# 3. probes
# ---------------------------------------------------------------------------------------------------------------

def _m_blobs(n, centers, g, std=1.0):
    c = centers.shape[0]
    y = torch.arange(n) % c
    y = y[torch.randperm(n, generator=g)]
    return centers[y] + std * torch.randn(n, centers.shape[1], generator=g), y


def test_math_linear_probe_separable_vs_noise():
    g = torch.Generator().manual_seed(20)
    centers = 6.0 * torch.randn(5, 16, generator=g)
    xtr, ytr = _m_blobs(200, centers, g)
    xte, yte = _m_blobs(100, centers, g)
    train = {"sep": xtr, "noise": torch.randn(200, 16, generator=g)}
    test = {"sep": xte, "noise": torch.randn(100, 16, generator=g)}
    res = sr.linear_probe(train, ytr, test, yte, seed=0)
    assert {k for k in res if "/" not in k} == {"sep", "noise"}, sorted(res)
    assert res["sep"] >= 0.97, res
    assert abs(res["noise"] - 0.2) < 0.12, res
    for k, v in res.items():
        assert 0.0 <= v <= 1.0, (k, v)
    if "sep/top5" in res:
        assert res["sep/top5"] >= res["sep"]


def test_math_linear_probe_list_names():
    g = torch.Generator().manual_seed(21)
    centers = 6.0 * torch.randn(3, 8, generator=g)
    xtr, ytr = _m_blobs(60, centers, g)
    xte, yte = _m_blobs(30, centers, g)
    res = sr.linear_probe([xtr, xtr * 2.0], ytr, [xte, xte * 2.0], yte, seed=0)
    assert {k for k in res if "/" not in k} == {"0", "1"}, sorted(res)
    assert res["0"] >= 0.9 and res["1"] >= 0.9, res


def _m_dino_knn(train, ytr, test, yte, k, t, num_classes):
    """DINO eval_knn.knn_classifier: L2-normalise, sim = test @ train.T, top-k, weights exp(sim/T), one-hot vote sum."""
    train = torch.nn.functional.normalize(train.float(), dim=1)
    test = torch.nn.functional.normalize(test.float(), dim=1)
    sim = test @ train.T
    dist, idx = sim.topk(k, dim=1, largest=True, sorted=True)
    neigh = ytr[idx]  # (n_test, k)
    onehot = torch.zeros(test.shape[0], k, num_classes)
    onehot.scatter_(2, neigh.unsqueeze(-1), 1.0)
    w = (dist / t).exp()
    probs = (onehot * w.unsqueeze(-1)).sum(1)
    pred = probs.argmax(1)
    return (pred == yte).float().mean().item(), probs


def test_math_knn_matches_dino_reference():
    g = torch.Generator().manual_seed(22)
    c = 4
    centers = 1.0 * torch.randn(c, 12, generator=g)
    xtr, ytr = _m_blobs(120, centers, g, std=1.5)
    xte, yte = _m_blobs(60, centers, g, std=1.5)
    rand_tr, rand_te = torch.randn(120, 20, generator=g), torch.randn(60, 20, generator=g)
    res = sr.knn_accuracy({"blob": xtr, "rand": rand_tr}, ytr, {"blob": xte, "rand": rand_te}, yte, k=5,
                          temperature=0.07)
    for name, a, b in (("blob", xtr, xte), ("rand", rand_tr, rand_te)):
        ref, probs = _m_dino_knn(a, ytr, b, yte, 5, 0.07, c)
        top2 = probs.topk(2, dim=1).values
        # no near-ties: otherwise summation order could legitimately flip a prediction
        assert ((top2[:, 0] - top2[:, 1]) / top2[:, 0] > 1e-5).all()
        assert res[name] == pytest.approx(ref, abs=1e-12), (name, res[name], ref)
    assert 0.0 < res["blob"] <= 1.0


def test_math_knn_num_classes_and_k20():
    g = torch.Generator().manual_seed(23)
    xtr = torch.randn(80, 10, generator=g)
    ytr = torch.randint(0, 3, (80,), generator=g)
    xte = torch.randn(40, 10, generator=g)
    yte = torch.randint(0, 3, (40,), generator=g)
    ref, _ = _m_dino_knn(xtr, ytr, xte, yte, 20, 0.07, 7)
    res = sr.knn_accuracy({"f": xtr}, ytr, {"f": xte}, yte, num_classes=7)
    assert res["f"] == pytest.approx(ref, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 4. analyses
# ---------------------------------------------------------------------------------------------------------------

def _m_centered_orthonormal(n, k, g):
    """n x k matrix with orthonormal columns that are all orthogonal to the ones vector (already mean-centred)."""
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    a = a - a.mean(0, keepdim=True)
    q, _ = torch.linalg.qr(a)
    return q


def _m_spectrum_features(s, n=60, d=20, seed=30):
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(s, dtype=torch.float64)
    u = _m_centered_orthonormal(n, len(s), g)
    v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64))
    x = u @ torch.diag(s) @ v.T
    return x + 5.0 * torch.randn(1, d, generator=g, dtype=torch.float64)  # a shared mean must be ignored


@pytest.mark.parametrize("k", [1, 3, 7])
def test_math_effective_rank_known_spectrum(k):
    if not hasattr(sr, "effective_rank"):
        pytest.skip("sr.effective_rank not implemented yet")
    x = _m_spectrum_features([2.0] * k + [0.0] * (10 - k))
    assert float(sr.effective_rank(x.float())) == pytest.approx(k, rel=1e-3)
    assert float(sr.effective_rank(x)) == pytest.approx(k, rel=1e-3)


def test_math_effective_rank_unequal_spectrum():
    if not hasattr(sr, "effective_rank"):
        pytest.skip("sr.effective_rank not implemented yet")
    s = np.array([3.0, 2.0, 1.0])
    p = s / s.sum()
    ref = float(np.exp(-(p * np.log(p)).sum()))  # Roy & Vetterli: exp(H(p)), p_i = s_i / sum s
    x = _m_spectrum_features(list(s))
    assert float(sr.effective_rank(x)) == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_math_participation_ratio_equal_eigenvalues(k):
    if not hasattr(sr, "participation_ratio"):
        pytest.skip("sr.participation_ratio not implemented yet")
    x = _m_spectrum_features([1.5] * k)
    assert float(sr.participation_ratio(x)) == pytest.approx(k, rel=1e-3)


def test_math_participation_ratio_unequal():
    if not hasattr(sr, "participation_ratio"):
        pytest.skip("sr.participation_ratio not implemented yet")
    # singular values 3, 2, 1 -> covariance eigenvalues proportional to 9, 4, 1 -> 14^2 / 98 = 2
    x = _m_spectrum_features([3.0, 2.0, 1.0])
    assert float(sr.participation_ratio(x)) == pytest.approx(2.0, rel=1e-4)


def _m_table(t):
    t = np.asarray(t.tolist() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
    return t


def test_math_prediction_agreement_identical():
    if not hasattr(sr, "prediction_agreement"):
        pytest.skip("sr.prediction_agreement not implemented yet")
    a = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    r = sr.prediction_agreement(a, a.clone())
    assert float(r["kappa"]) == pytest.approx(1.0, abs=1e-12)
    assert float(r["hamming"]) == pytest.approx(0.0, abs=1e-12)
    t = _m_table(r["table"])
    assert t[0, 1] == 0 and t[1, 0] == 0
    assert t.sum() in (pytest.approx(10.0), pytest.approx(1.0))


def test_math_prediction_agreement_hand_kappa():
    if not hasattr(sr, "prediction_agreement"):
        pytest.skip("sr.prediction_agreement not implemented yet")
    a = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 1, 1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    # both 4, a_only 2, b_only 1, neither 3; p_o = 0.7; p_e = 0.6*0.5 + 0.4*0.5 = 0.5; kappa = 0.2/0.5 = 0.4
    r = sr.prediction_agreement(a, b)
    assert float(r["kappa"]) == pytest.approx(0.4, abs=1e-9)
    assert float(r["hamming"]) == pytest.approx(0.3, abs=1e-9)
    t = _m_table(r["table"])
    expected = np.array([[4.0, 2.0], [1.0, 3.0]])
    assert np.allclose(t, expected) or np.allclose(t, expected / 10.0), t
    # numpy / int inputs give the same answer
    r2 = sr.prediction_agreement(a.numpy().astype(int), b.numpy().astype(int))
    assert float(r2["kappa"]) == pytest.approx(0.4, abs=1e-9)
    if hasattr(sr, "cohen_kappa"):
        assert float(sr.cohen_kappa(a, b)) == pytest.approx(0.4, abs=1e-9)
