"""ResNet and ConvNeXt checkpoints (issue 23): every release layout, written by hand from one set of canonical
weights, loads by path with no hint, reports its family (or `unknown` where only a name could tell), and reproduces
a naive forward written here with torch.nn.functional (not the models under test) at every stage, block, the stem
and the pooled output, on a non-square input; feature maps are tokens; the commands run on CNNs beside ViTs.

Canonical names are torchvision's for ResNets and the official repository's for ConvNeXts; each layout writer below
maps them to the release's own names (read from the official repositories, see README "Supported checkpoints").
"""
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ssl_repsim as sr
import test_ssl_repsim as T

ATOL = RTOL = 1e-4
X = torch.randn(2, 3, 72, 104, generator=torch.Generator().manual_seed(7))   # non-square, not a multiple of 32


# --- canonical random weights ------------------------------------------------------------------------------------

def resnet_params(seed=0, depths=(1, 2, 1, 1), stem=8, inner=(4, 6, 8, 10), widths=(12, 16, 20, 24), groups=1,
                  classes=0):
    """torchvision-named bottleneck ResNet weights, every BatchNorm statistic and affine moved off 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    P = {}

    def bn(name, n):
        P.update({f"{name}.weight": 1 + r(n), f"{name}.bias": r(n), f"{name}.running_mean": r(n),
                  f"{name}.running_var": 0.5 + r(n).abs(), f"{name}.num_batches_tracked": torch.tensor(100)})

    P["conv1.weight"] = r(stem, 3, 7, 7)
    bn("bn1", stem)
    cin = stem
    for s, (n, w, cout) in enumerate(zip(depths, inner, widths, strict=True)):
        for j in range(n):
            b = f"layer{s + 1}.{j}"
            P[f"{b}.conv1.weight"] = r(w, cin, 1, 1) / math.sqrt(cin)
            bn(f"{b}.bn1", w)
            P[f"{b}.conv2.weight"] = r(w, w // groups, 3, 3) / math.sqrt(w)
            bn(f"{b}.bn2", w)
            P[f"{b}.conv3.weight"] = r(cout, w, 1, 1) / math.sqrt(w)
            bn(f"{b}.bn3", cout)
            if j == 0:
                P[f"{b}.downsample.0.weight"] = r(cout, cin, 1, 1) / math.sqrt(cin)
                bn(f"{b}.downsample.1", cout)
            cin = cout
    if classes:
        P["fc.weight"], P["fc.bias"] = r(classes, cin), r(classes)
    return P


def convnext_params(seed=0, depths=(1, 1, 2, 1), widths=(8, 12, 16, 20), grn=False, layer_scale=True,
                    final_norm=True, classes=0):
    """Official-repository-named ConvNeXt weights (V1 with layer scale, or V2 with GRN), all off 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    P = {"downsample_layers.0.0.weight": r(widths[0], 3, 4, 4), "downsample_layers.0.0.bias": r(widths[0]),
         "downsample_layers.0.1.weight": 1 + r(widths[0]), "downsample_layers.0.1.bias": r(widths[0])}
    for i, (n, d) in enumerate(zip(depths, widths, strict=True)):
        if i:
            P.update({f"downsample_layers.{i}.0.weight": 1 + r(widths[i - 1]),
                      f"downsample_layers.{i}.0.bias": r(widths[i - 1]),
                      f"downsample_layers.{i}.1.weight": r(d, widths[i - 1], 2, 2) / math.sqrt(widths[i - 1]),
                      f"downsample_layers.{i}.1.bias": r(d)})
        for j in range(n):
            b = f"stages.{i}.{j}"
            P.update({f"{b}.dwconv.weight": r(d, 1, 7, 7) / 3, f"{b}.dwconv.bias": r(d), f"{b}.norm.weight": 1 + r(d),
                      f"{b}.norm.bias": r(d), f"{b}.pwconv1.weight": r(4 * d, d) / math.sqrt(d),
                      f"{b}.pwconv1.bias": r(4 * d), f"{b}.pwconv2.weight": r(d, 4 * d) / math.sqrt(d),
                      f"{b}.pwconv2.bias": r(d)})
            if grn:
                P[f"{b}.grn.gamma"], P[f"{b}.grn.beta"] = r(1, 1, 1, 4 * d), r(1, 1, 1, 4 * d)
            if layer_scale:
                P[f"{b}.gamma"] = 0.5 + r(d).abs()
    if final_norm:
        P["norm.weight"], P["norm.bias"] = 1 + r(widths[-1]), r(widths[-1])
    if classes:
        P["head.weight"], P["head.bias"] = r(classes, widths[-1]), r(classes)
    return P


# --- naive forwards, from the papers' definitions --------------------------------------------------------------

def naive_resnet(P, x, stride_in_1x1=False):
    """{stem, every block by torchvision name, layer1..4, pooled}: conv-BN-ReLU-maxpool, then bottlenecks
    relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(h)))))))) + shortcut(h)), BatchNorm with running statistics."""
    def bn(t, n):
        return (t - P[f"{n}.running_mean"][:, None, None]) / torch.sqrt(P[f"{n}.running_var"][:, None, None] + 1e-5) \
            * P[f"{n}.weight"][:, None, None] + P[f"{n}.bias"][:, None, None]
    x = x.double()
    P = {k: v.double() for k, v in P.items() if v.is_floating_point()}
    h = F.max_pool2d(F.relu(bn(F.conv2d(x, P["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    out = {"stem": h}
    stages = sorted({int(m.group(1)) for k in P if (m := re.match(r"layer(\d)\.", k))})
    for s in stages:
        blocks = sorted({int(m.group(1)) for k in P if (m := re.match(rf"layer{s}\.(\d+)\.", k))})
        for j in blocks:
            b, stride = f"layer{s}.{j}", 2 if j == 0 and s > 1 else 1
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            groups = P[f"{b}.conv1.weight"].shape[0] // P[f"{b}.conv2.weight"].shape[1]
            y = F.relu(bn(F.conv2d(h, P[f"{b}.conv1.weight"], stride=s1), f"{b}.bn1"))
            y = F.relu(bn(F.conv2d(y, P[f"{b}.conv2.weight"], stride=s3, padding=1, groups=groups), f"{b}.bn2"))
            y = bn(F.conv2d(y, P[f"{b}.conv3.weight"]), f"{b}.bn3")
            short = bn(F.conv2d(h, P[f"{b}.downsample.0.weight"], stride=stride), f"{b}.downsample.1") \
                if f"{b}.downsample.0.weight" in P else h
            h = out[b] = F.relu(y + short)
        out[f"layer{s}"] = h
    out["pooled"] = h.mean((2, 3))
    return out


def naive_convnext(P, x, final_eps=1e-6):
    """{stem, every block by official name, stages.i, pooled}: the official ConvNeXt, its channels-first LayerNorm
    written out; V2's GRN x + γ·(x·N(x)) + β with N = ‖x‖₂ over H, W / its channel mean (+1e-6); pooled = final
    LayerNorm of the global average (without affine where the file has none)."""
    def ln_first(t, n):
        u = t.mean(1, keepdim=True)
        v = (t - u).pow(2).mean(1, keepdim=True)
        return P[f"{n}.weight"][:, None, None] * (t - u) / torch.sqrt(v + 1e-6) + P[f"{n}.bias"][:, None, None]

    def ln_last(t, w, b, eps):
        u = t.mean(-1, keepdim=True)
        v = (t - u).pow(2).mean(-1, keepdim=True)
        t = (t - u) / torch.sqrt(v + eps)
        return t * w + b if w is not None else t
    x = x.double()
    P = {k: v.double() for k, v in P.items()}
    h = ln_first(F.conv2d(x, P["downsample_layers.0.0.weight"], P["downsample_layers.0.0.bias"], stride=4),
                 "downsample_layers.0.1")
    out = {"stem": h}
    stages = sorted({int(m.group(1)) for k in P if (m := re.match(r"stages\.(\d)\.", k))})
    for i in stages:
        if i:
            h = F.conv2d(ln_first(h, f"downsample_layers.{i}.0"), P[f"downsample_layers.{i}.1.weight"],
                         P[f"downsample_layers.{i}.1.bias"], stride=2)
        for j in sorted({int(m.group(1)) for k in P if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))}):
            b, d = f"stages.{i}.{j}", h.shape[1]
            y = F.conv2d(h, P[f"{b}.dwconv.weight"], P[f"{b}.dwconv.bias"], padding=3, groups=d).permute(0, 2, 3, 1)
            y = ln_last(y, P[f"{b}.norm.weight"], P[f"{b}.norm.bias"], 1e-6)
            y = F.gelu(y @ P[f"{b}.pwconv1.weight"].T + P[f"{b}.pwconv1.bias"])
            if f"{b}.grn.gamma" in P:
                gx = y.pow(2).sum((1, 2), keepdim=True).sqrt()
                y = P[f"{b}.grn.gamma"].reshape(-1) * (y * gx / (gx.mean(-1, keepdim=True) + 1e-6)) \
                    + P[f"{b}.grn.beta"].reshape(-1) + y
            y = y @ P[f"{b}.pwconv2.weight"].T + P[f"{b}.pwconv2.bias"]
            y = y * P[f"{b}.gamma"] if f"{b}.gamma" in P else y
            h = out[b] = h + y.permute(0, 3, 1, 2)
        out[f"stages.{i}"] = h
    out["pooled"] = ln_last(h.mean((2, 3)), P.get("norm.weight"), P.get("norm.bias"), final_eps)
    return out


# --- the release layouts, each written from the canonical names ------------------------------------------------

def _save(path, obj):
    torch.save(obj, path)
    return path


def _folder(d, config, sd, pre=None):
    """A hub-style folder: config.json (+ preprocessor_config.json) and model.safetensors."""
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    if pre is not None:
        (d / "preprocessor_config.json").write_text(json.dumps(pre))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def hf_resnet_names(P):
    """torchvision → transformers ResNetModel names (stages from 0, the three convs as layer.0/1/2)."""
    out = {}
    for k, v in P.items():
        k = re.sub(r"^conv1\.", "embedder.embedder.convolution.", k)
        k = re.sub(r"^bn1\.", "embedder.embedder.normalization.", k)
        k = re.sub(r"^layer(\d)\.(\d+)\.", lambda m: f"encoder.stages.{int(m.group(1)) - 1}.layers.{m.group(2)}.", k)
        k = k.replace(".downsample.0.", ".shortcut.convolution.").replace(".downsample.1.", ".shortcut.normalization.")
        k = re.sub(r"\.conv(\d)\.", lambda m: f".layer.{int(m.group(1)) - 1}.convolution.", k)
        k = re.sub(r"\.bn(\d)\.", lambda m: f".layer.{int(m.group(1)) - 1}.normalization.", k)
        out[k] = v
    return out


def timm_convnext_names(P, conv_mlp=False):
    """official → timm ConvNeXt names (stem, stages.i.downsample, blocks.j.conv_dw / mlp.fc1 / mlp.grn, head.norm);
    conv_mlp: the MLP as 1×1 convolutions (timm's atto…nano), GRN as timm's (C,) weight / bias."""
    out = {}
    for k, v in P.items():
        k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
        k = re.sub(r"^downsample_layers\.(\d)\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^stages\.(\d)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        k = k.replace(".grn.gamma", ".mlp.grn.weight").replace(".grn.beta", ".mlp.grn.bias")
        k = re.sub(r"^norm\.", "head.norm.", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        if ".mlp.grn." in k:
            v = v.reshape(-1)
        if conv_mlp and re.search(r"\.mlp\.fc[12]\.weight$", k):
            v = v[:, :, None, None]
        out[k] = v
    return out


def hf_convnext_names(P):
    """official → transformers ConvNextModel / ConvNextV2Model names."""
    out = {}
    for k, v in P.items():
        k = re.sub(r"^downsample_layers\.0\.0\.", "embeddings.patch_embeddings.", k)
        k = re.sub(r"^downsample_layers\.0\.1\.", "embeddings.layernorm.", k)
        k = re.sub(r"^downsample_layers\.(\d)\.", r"encoder.stages.\1.downsampling_layer.", k)
        k = re.sub(r"^stages\.(\d)\.(\d+)\.", r"encoder.stages.\1.layers.\2.", k)
        k = k.replace(".norm.", ".layernorm.").replace(".gamma", ".layer_scale_parameter") \
            if k.startswith("encoder.stages") and ".grn." not in k else k
        k = k.replace(".grn.gamma", ".grn.weight").replace(".grn.beta", ".grn.bias")
        k = re.sub(r"^norm\.", "layernorm.", k)
        out[k] = v
    return out


def fcmae_sparse(P):
    """ConvNeXt-V2 FCMAE's release: the MinkowskiEngine encoder under encoder. — depthwise kernels (k², C) with
    W[c, 0, h, w] = kernel[w·k + h, c], downsampling kernels (k², in, out), (1, C) biases and GRN, norms under .ln,
    linears under .linear — beside the decoder, mask token, projection and prediction head."""
    out = {"mask_token": torch.zeros(1, 4, 1, 1), "proj.weight": torch.ones(4, 20, 1, 1), "proj.bias": torch.ones(4),
           "decoder.0.dwconv.weight": torch.ones(4, 1, 7, 7), "pred.weight": torch.ones(48, 4, 1, 1)}
    for k, v in P.items():
        if k.endswith("dwconv.weight"):
            c, _, kk, _ = v.shape
            out["encoder." + k.replace(".weight", ".kernel")] = v[:, 0].transpose(1, 2).reshape(c, kk * kk).T
        elif re.match(r"downsample_layers\.[1-9]\.1\.weight$", k):
            o, i, kk, _ = v.shape
            out["encoder." + k.replace(".weight", ".kernel")] = v.transpose(2, 3).reshape(o, i, kk * kk).permute(2, 1, 0)
        elif re.search(r"(dwconv|downsample_layers\.[1-9]\.1)\.bias$", k) or ".grn." in k:
            out["encoder." + k] = v.reshape(1, -1)
        elif re.match(r"(stages\.\d\.\d+\.norm|downsample_layers\.[1-9]\.0)\.", k):
            out["encoder." + re.sub(r"\.(weight|bias)$", r".ln.\1", k)] = v
        elif ".pwconv" in k:
            out["encoder." + re.sub(r"\.(weight|bias)$", r".linear.\1", k)] = v
        else:
            out["encoder." + k] = v
    return {"model": {k: v.contiguous() for k, v in out.items()}}


TIMM_RESNET_CFG = {"architecture": "resnet50", "num_classes": 0,
                   "pretrained_cfg": {"tag": "a1_in1k", "input_size": [3, 224, 224], "interpolation": "bicubic",
                                      "crop_pct": 0.95, "crop_mode": "center", "mean": list(sr.IMAGENET_MEAN),
                                      "std": list(sr.IMAGENET_STD)}}


def write_layout(name, d):
    """(path, canonical weights, family expected by path with no hint, naive forward's options)."""
    R, Rfc = resnet_params(1), resnet_params(1, classes=5)
    V1, V2 = convnext_params(2, classes=5), convnext_params(3, grn=True, layer_scale=False, classes=5)
    FC = convnext_params(4, grn=True, layer_scale=False, final_norm=False)
    head = lambda P: {k: v for k, v in P.items() if not k.startswith(("fc.", "head."))}
    proj = {"fc.0.weight": torch.ones(6, 24), "fc.1.weight": torch.ones(6), "fc.1.bias": torch.zeros(6),
            "fc.1.running_mean": torch.zeros(6), "fc.1.running_var": torch.ones(6), "fc.3.weight": torch.ones(4, 6)}
    if name == "torchvision":
        return _save(d / "resnet_tv.pth", Rfc), R, "unknown", {}
    if name == "mocov3_r50":
        enc = {**R, **proj}
        obj = {"epoch": 300, "arch": "resnet50", "optimizer": {"state": {}, "param_groups": []},
               "state_dict": {**{f"module.base_encoder.{k}": v for k, v in enc.items()},
                              **{f"module.momentum_encoder.{k}": v + 1 for k, v in enc.items()},
                              "module.predictor.0.weight": torch.ones(4, 4)}}
        return _save(d / "ckpt_r50.pth.tar", obj), R, "mocov3", {}
    if name == "mocov2":
        obj = {"epoch": 800, "arch": "resnet50",
               "state_dict": {**{f"module.encoder_q.{k}": v for k, v in {**R, "fc.0.weight": torch.ones(6, 24),
                                                                          "fc.2.weight": torch.ones(4, 6)}.items()},
                              **{f"module.encoder_k.{k}": v - 1 for k, v in R.items()},
                              "module.queue": torch.zeros(4, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}
        return _save(d / "moco_ckpt.pth.tar", obj), R, "mocov2", {}
    if name == "swav":
        obj = {**{f"module.{k}": v for k, v in R.items()}, "module.projection_head.0.weight": torch.ones(6, 24),
               "module.projection_head.0.bias": torch.ones(6), "module.prototypes.weight": torch.ones(10, 6)}
        return _save(d / "swav_ckpt.pth.tar", obj), R, "swav", {}
    if name == "dino_r50":
        return _save(d / "dino_resnet50_pretrain.pth", head(R)), R, "dino", {}
    if name == "timm_resnet":
        return _folder(d / "timm_resnet", TIMM_RESNET_CFG, head(R)), R, "resnet", {}
    if name in ("hf_resnet", "hf_resnet_1x1"):
        cfg = {"model_type": "resnet", "architectures": ["ResNetModel"], "layer_type": "bottleneck",
               "hidden_act": "relu", "embedding_size": 8, "hidden_sizes": [12, 16, 20, 24], "depths": [1, 2, 1, 1],
               "downsample_in_first_stage": False, "downsample_in_bottleneck": name == "hf_resnet_1x1"}
        return _folder(d / name, cfg, hf_resnet_names(head(R))), R, "resnet", {"stride_in_1x1": name == "hf_resnet_1x1"}
    if name == "convnext_v1":
        return _save(d / "convnext_ckpt.pth", {"model": V1}), V1, "convnext", {}
    if name == "convnextv2_ft":
        return _save(d / "convnextv2_ckpt.pt", {"model": V2}), V2, "convnextv2", {}
    if name == "fcmae":
        return _save(d / "fcmae_ckpt.pt", fcmae_sparse(FC)), FC, "fcmae", {}
    if name in ("timm_convnext", "timm_convnextv2_fcmae"):
        P, arch = (V1, "convnext_tiny") if name == "timm_convnext" else (FC, "convnextv2_atto")
        cfg = {"architecture": arch, "num_classes": 0, "pretrained_cfg": {"tag": "fb_in1k" if P is V1 else "fcmae",
                                                                          "crop_pct": 0.875, "interpolation": "bicubic"}}
        return _folder(d / name, cfg, timm_convnext_names(head(P), conv_mlp=P is FC)), head(P), \
            "convnext" if P is V1 else "fcmae", {}
    if name in ("hf_convnext", "hf_convnextv2"):
        P = V1 if name == "hf_convnext" else V2
        cfg = {"model_type": "convnext" if P is V1 else "convnextv2", "hidden_sizes": [8, 12, 16, 20],
               "depths": [1, 1, 2, 1], "hidden_act": "gelu", "layer_norm_eps": 1e-12}
        pre = {"crop_pct": 0.875, "size": {"shortest_edge": 224}, "resample": 3, "do_resize": True,
               "do_normalize": True, "image_mean": list(sr.IMAGENET_MEAN), "image_std": list(sr.IMAGENET_STD)}
        return _folder(d / name, cfg, hf_convnext_names(head(P)), pre), head(P), \
            "convnext" if P is V1 else "convnextv2", {"final_eps": 1e-12}
    raise KeyError(name)


CNN_LAYOUTS = ("torchvision", "mocov3_r50", "mocov2", "swav", "dino_r50", "timm_resnet", "hf_resnet", "hf_resnet_1x1",
               "convnext_v1", "convnextv2_ft", "fcmae", "timm_convnext", "timm_convnextv2_fcmae", "hf_convnext",
               "hf_convnextv2")


def check_against_naive(model, P, opts, x=X):
    """Every block, stage, the stem and the pooled output against the naive forward, as (n, H·W, C) tokens."""
    ref = naive_resnet(P, x, **opts) if "conv1.weight" in P else naive_convnext(P, x, **opts)
    for kind in ("blocks", "stages", "stem"):
        feats = sr.extract(model, x, points=kind, tokens="all")
        names = list(feats)
        expected = [k for k in ref if re.fullmatch(r"layer\d\.\d+|stages\.\d\.\d+", k)] if kind == "blocks" else \
            [k for k in ref if re.fullmatch(r"layer\d|stages\.\d", k)] if kind == "stages" else ["stem"]
        assert len(names) == len(expected), (kind, names, expected)
        for got_name, exp_name in zip(names, expected, strict=True):
            assert kind == "stem" or got_name == exp_name, (got_name, exp_name)   # named by module path
            T.assert_near(feats[got_name], ref[exp_name].flatten(2).transpose(1, 2), f"{got_name}", ATOL, RTOL)
    T.assert_near(sr.extract(model, x, tokens="official")["official"], ref["pooled"], "pooled", ATOL, RTOL)
    last = [k for k in ref if re.fullmatch(r"layer\d\.\d+|stages\.\d\.\d+", k)][-1]
    T.assert_near(sr.extract(model, x, points=last, tokens="mean")[last], ref[last].mean((2, 3)),
                  "mean tokens = global average pool", ATOL, RTOL)
    return ref


@pytest.mark.parametrize("name", CNN_LAYOUTS)
def test_cnn_release_layouts_load_by_path_and_match_a_naive_forward(name, tmp_path):
    path, P, family, opts = write_layout(name, tmp_path)
    model = sr.load_model(str(path))
    assert model.family == family
    assert isinstance(model, sr.ConvNet) and model.head is None   # projectors, predictors, heads dropped
    check_against_naive(model, P, opts)


FLAT_NAMED = ("barlowtwins", "vicreg", "spark", "dino", "resnet")


def test_every_cnn_family_has_a_layout_writer(tmp_path):
    """Adding a CNN row to FAMILIES means adding a writer here (or naming it as a flat torchvision file)."""
    covered = {write_layout(name, tmp_path)[2] for name in CNN_LAYOUTS} | set(FLAT_NAMED)
    assert set(T.CNN_FAMILIES) <= covered
    cnn_rows = {f for f, fam in sr.FAMILIES.items() if any(lay in sr.CNN_LAYOUTS or lay.reshape for lay in fam.layouts)}
    assert cnn_rows <= covered | {"unknown"}


@pytest.mark.parametrize("family", FLAT_NAMED)
def test_flat_torchvision_files_take_the_family_a_name_gives(family, tmp_path):
    """A flat torchvision-layout file cannot tell its training from its keys: `unknown` by path, the family when the
    user says it (FAMILY:PATH); the weights are the same either way."""
    P = resnet_params(5)
    path = _save(tmp_path / "resnet50.pth", P)
    assert sr.load_model(str(path)).family == "unknown"
    m = sr.load_model(f"{family}:{path}")
    assert m.family == family and m.preprocess == sr.FAMILIES[family].preprocess
    check_against_naive(m, P, {}, X[:1])


def test_library_configs_set_stride_eps_and_preprocessing(tmp_path):
    """transformers' downsample_in_bottleneck moves the stride to the first 1×1 conv (the two placements give
    different maps of the same keys); its ConvNeXt keeps layer_norm_eps for the final norm and crop_pct for the
    resize; timm's pretrained_cfg gives crop and interpolation; a supervised timm tag is not 'fine-tuned'."""
    path, P, _, _ = write_layout("hf_resnet_1x1", tmp_path)
    m = sr.load_model(str(path))
    assert m.cfg.stride_in_1x1
    ref3 = naive_resnet(P, X)
    assert (sr.extract(m, X, points="layer2.0", tokens="all")["layer2.0"] - ref3["layer2.0"].flatten(2).transpose(1, 2)
            ).abs().max() > 1e-3   # the 3×3 placement would not pass check_against_naive
    path, _, _, _ = write_layout("hf_convnext", tmp_path)
    m = sr.load_model(str(path))
    assert m.cfg.final_eps == 1e-12 and m.preprocess["crop_pct"] == 0.875 and m.input_size == 224
    path, _, _, _ = write_layout("timm_resnet", tmp_path)
    m = sr.load_model(str(path))
    assert m.preprocess["crop_pct"] == 0.95 and m.preprocess["interp"] == "bicubic"
    assert sr._model_meta(m)["objective"] == "SUP"
    (tmp_path / "hf_resnet_1x1" / "config.json").write_text(json.dumps({"model_type": "resnet", "layer_type": "basic"}))
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(tmp_path / "hf_resnet_1x1"))
    T.assert_one_line(e)


def test_cnn_points_tokens_and_errors(tmp_path):
    """Points by module path (blocks, stages, stem, sublayers, all); ConvNeXt's channels-last sub-layers read as
    the same (n, H·W, C) tokens; cls is a one-line error; a ResNet of basic blocks and a gap in the blocks are
    one-line errors before anything is built."""
    P = convnext_params(6, grn=True, layer_scale=False)
    path = _save(tmp_path / "v2.pt", {"model": P})
    m = sr.load_model(str(path))
    subs = sr.resolve_points(m, "sublayers")
    assert subs[:6] == [f"stages.0.0.{s}" for s in ("dwconv", "norm", "pwconv1", "act", "grn", "pwconv2")]
    assert sr.resolve_points(m, "all")[0] == "downsample_layers.0" and sr.resolve_points(m, "all")[7] == "stages.0.0"
    feats = sr.extract(m, X, points="stages.1.0.dwconv,stages.1.0.norm,stages.1.0.pwconv1", tokens="all")
    assert feats["stages.1.0.dwconv"].shape[-1] == 12 and feats["stages.1.0.pwconv1"].shape[-1] == 48
    assert feats["stages.1.0.norm"].shape[1] == feats["stages.1.0.dwconv"].shape[1] == (72 // 8) * (104 // 8)
    Pn = {k: v.double() for k, v in P.items()}
    dw = feats["stages.1.0.dwconv"].double()
    normed = F.layer_norm(dw, (12,), Pn["stages.1.0.norm.weight"], Pn["stages.1.0.norm.bias"], 1e-6)
    T.assert_near(feats["stages.1.0.norm"], normed, "norm after dwconv, channels last", ATOL, RTOL)
    T.assert_near(feats["stages.1.0.pwconv1"], normed @ Pn["stages.1.0.pwconv1.weight"].T + Pn["stages.1.0.pwconv1.bias"],
                  "pwconv1", ATOL, RTOL)
    with pytest.raises(sr.UsageError) as e:
        sr.extract(m, X, tokens="cls")
    T.assert_one_line(e)
    R = resnet_params(7)
    basic = {k: v for k, v in R.items() if ".conv3." not in k and ".bn3." not in k}
    gap = {**R, **{k.replace("layer2.1.", "layer2.3."): v for k, v in R.items() if k.startswith("layer2.1.")}}
    for bad, why in ((basic, "basic blocks"), (gap, "without gaps")):
        with pytest.raises(sr.UsageError) as e:
            sr.load_model(str(_save(tmp_path / "bad.pth", bad)))
        T.assert_one_line(e)
        assert why in str(e.value)


def test_extract_stages_all_tokens_writes_the_feature_maps(tmp_path):
    """`extract MODEL --points stages --tokens all` writes (n, H·W, C) per stage: the naive stage outputs of the
    preprocessed images, positions in row-major order; cka reads such a file as flat tokens."""
    P = resnet_params(8)
    path = _save(tmp_path / "r.pth", P)
    imgs = torch.randint(0, 256, (6, 3, 73, 73), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    T.write_tensor_file(tmp_path / "imgs.pt", imgs, torch.arange(6) % 2)
    p = T.cli("extract", f"barlowtwins:{path}", "--img-size", 64, "--data", tmp_path / "imgs.pt", "--points", "stages",
              "--tokens", "all", "--quiet", "--out", tmp_path / "f.safetensors")
    assert p.returncode == 0, p.stderr
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "f.safetensors"))
    # int(64 / 0.875) = 73: no resize, a centre crop of 64 from offset 4, then ImageNet normalisation (bilinear family)
    x = imgs[:, :, 4:68, 4:68].double() / 255
    x = (x - torch.tensor(sr.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(sr.IMAGENET_STD).view(1, 3, 1, 1)
    ref = naive_resnet(P, x)
    for s in range(1, 5):
        exp = ref[f"layer{s}"].flatten(2).transpose(1, 2)
        assert got[f"layer{s}"].shape == exp.shape == (6, (64 // (4 << (s - 1))) ** 2, P[f"layer{s}.0.conv3.weight"].shape[0])
        T.assert_near(got[f"layer{s}"], exp, f"layer{s}", ATOL, RTOL)
    feats, _, meta = sr.read_features(tmp_path / "f.safetensors")
    assert feats["layer4"].shape == (6, exp.shape[1] * exp.shape[2]) and meta["model"]["architecture"] == "resnet"


def _tiny_vit_release(kind, seed, path):
    """A tiny ViT in MAE's ({"model": ...}), DINO's ({"teacher": backbone.*}) or MoCo v3's container."""
    sd = T.tiny_model(seed, perturb=True).state_dict()
    obj = {"model": sd} if kind == "mae" else {"teacher": {f"backbone.{k}": v for k, v in sd.items()}} \
        if kind == "dino" else {"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}
    return _save(path, obj)


def test_registry_names_run_cka_and_the_report_tests_the_cross_architecture_claim(tmp_path):
    """`cka mocov3 mocov3_r50` and `report mae convnextv2_base_fcmae dino dino_r50` with tiny stand-ins placed where
    the registry keeps them: both run; the report's across-architectures section lists the pairs and its verdict
    row carries the paired test, whose p is recomputed here from the stored jackknife replicates."""
    w = tmp_path / "w"
    w.mkdir()
    _tiny_vit_release("mae", 0, sr.registry_path("mae-vitb16", w))
    _tiny_vit_release("dino", 1, sr.registry_path("dino-vitb16", w))
    _tiny_vit_release("mocov3", 2, sr.registry_path("mocov3-vitb16", w))
    torch.save(fcmae_sparse(convnext_params(4, grn=True, layer_scale=False, final_norm=False)),
               sr.registry_path("convnextv2-base-fcmae", w))
    torch.save({k: v for k, v in resnet_params(1).items()}, sr.registry_path("dino-r50", w))
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in resnet_params(2).items()}},
               sr.registry_path("mocov3-r50", w))
    common = ["--weights-dir", w, "--num-heads", 2, "--n", 40, "--quiet"]
    p = T.cli("cka", "mocov3", "mocov3_r50", *common, "--out", tmp_path / "c")
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "c" / "cka.json").read_text())
    assert res["pairs"][0]["layers_b"][0] == "layer1.0" and len(res["pairs"][0]["layers_b"]) == 5
    p = T.cli("report", "mae", "convnextv2_base_fcmae", "dino", "dino_r50", *common, "--skip",
              "info,invariance,spatial,attention,agreement", "--permutations", 0, "--out", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    ov = rep["overview"]["results"]
    t = ov["across_architectures"]
    mm = ov["model_matrix"]
    arch = mm["architectures"]
    assert arch == ["vit", "convnext", "vit", "resnet"]
    assert sorted(map(tuple, t["same_objective"])) == [(0, 1), (2, 3)] and t["same_architecture"] == [[0, 2]]
    jk = torch.from_numpy(np.array(mm["jackknife"], dtype=float))   # JSON null (the diagonal's NaN) → NaN
    diff = (jk[0, 1] + jk[2, 3]) / 2 - jk[0, 2]                     # per-group replicate of the contrast
    g = len(diff)
    est = (mm["cka"][0][1] + mm["cka"][2][3]) / 2 - mm["cka"][0][2]
    se = math.sqrt((g - 1) / g * float(((diff - diff.mean()) ** 2).sum()))
    tstat = abs(est) / se
    from math import lgamma
    # two-sided t p-value with g - 1 degrees of freedom by numeric integration of the t density
    nu = g - 1
    dens = lambda x: math.exp(lgamma((nu + 1) / 2) - lgamma(nu / 2)) / math.sqrt(nu * math.pi) * (1 + x * x / nu) ** (-(nu + 1) / 2)
    steps = 20000
    h = tstat / steps
    cdf_mid = sum(dens((k + 0.5) * h) for k in range(steps)) * h
    p_hand = 1 - 2 * cdf_mid
    assert abs(t["diff"] - est) < 1e-9 and abs(t["p"] - p_hand) < 1e-4 * max(1, p_hand)
    assert "### Across architectures" in md and "vit × convnext" in md and "vit × resnet" in md
    row = next(line for line in md.splitlines() if line.startswith("| similar objectives learn similar features"))
    assert f"{t['p']:.2g}" in row and ("supported" in row) and "not testable" not in row


@pytest.mark.parametrize("grouped", [False, True])
def test_cnn_layer_ids_follow_convnextv2s_optim_factory(grouped):
    """ConvNeXt-V2's layer ids written out for a 3-3-27-3 ConvNeXt: 'single' one per block (downsampling and stem
    with the stage's first block, norm and head last), 'group' its 12 groups; lr_scale = decay^(L + 1 − id)."""
    depths = (3, 3, 27, 3)
    single = {"downsample_layers.0.0.weight": 1, "stages.0.0.dwconv.weight": 1, "stages.0.2.grn.gamma": 3,
              "downsample_layers.1.1.weight": 4, "stages.1.2.pwconv1.weight": 6, "downsample_layers.2.0.bias": 7,
              "stages.2.26.norm.weight": 33, "stages.3.2.pwconv2.bias": 36, "norm.weight": 37, "head.weight": 37}
    group = {"downsample_layers.0.0.weight": 0, "stages.0.0.dwconv.weight": 1, "stages.0.2.grn.gamma": 1,
             "downsample_layers.1.1.weight": 2, "stages.1.2.pwconv1.weight": 2, "downsample_layers.2.0.bias": 3,
             "stages.2.0.norm.weight": 3, "stages.2.7.norm.weight": 5, "stages.2.26.norm.weight": 11,
             "downsample_layers.3.1.weight": 12, "stages.3.2.pwconv2.bias": 12, "norm.weight": 13, "head.weight": 13}
    for name, expected in (group if grouped else single).items():
        assert sr.cnn_layer_id(name, depths, grouped) == expected, name
    resnet = {"conv1.weight": 1, "bn1.bias": 1, "layer1.0.conv1.weight": 1, "layer1.2.bn3.weight": 3,
              "layer2.0.downsample.0.weight": 4, "layer4.2.conv3.weight": 16, "head.weight": 17}
    if not grouped:
        for name, expected in resnet.items():
            assert sr.cnn_layer_id(name, (3, 4, 6, 3)) == expected, name


def test_finetuning_a_cnn_trains_a_fresh_norm_and_reloads(tmp_path):
    """FCMAE's encoder fine-tuned: a fresh final LayerNorm (weight 1, bias 0) and a head are trained, the blocks'
    lr scales follow cnn_layer_id; the saved checkpoint reloads as a
    fine-tuned ConvNeXt (REC+FT) whose forward is the naive one of its saved weights."""
    path = _save(tmp_path / "fcmae_ckpt.pt", fcmae_sparse(convnext_params(4, grn=True, layer_scale=False,
                                                                           final_norm=False)))
    model = sr.load_model(str(path), img_size=64)
    assert model.norm is None
    groups = sr.param_groups_lrd(model, 0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["stages.2.1.pwconv1.weight"] == 0.5 ** (5 + 1 - 4) and scale["downsample_layers.0.0.weight"] == 0.5 ** 5
    train = sr.synthetic_images(24, size=72, seed=0, num_classes=3)
    res = sr.finetune(model, train, epochs=1, batch_size=8, augment=False, device="cpu", out=tmp_path / "ft",
                      drop_path=0.2, label_smoothing=0.0)
    assert res is not None and [b.drop_path for b in model.blocks] == [0.0] * 5   # reset after training
    back = sr.load_model(str(tmp_path / "ft" / "checkpoint.safetensors"), head=True)
    assert isinstance(back, sr.ConvNeXt) and back.cfg.final_norm and back.head.out_features == 3
    assert sr._model_meta(back)["objective"] == "REC+FT"
    sd = {k: v for k, v in back.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert not torch.equal(sd["norm.weight"], torch.ones_like(sd["norm.weight"]))   # trained from 1
    ref = naive_convnext(sd, X)
    T.assert_near(sr.extract(back, X, tokens="official")["official"], ref["pooled"], "pooled after fine-tuning",
                  ATOL, RTOL)
    with torch.no_grad():
        T.assert_near(back.logits(X), ref["pooled"] @ sd["head.weight"].double().T + sd["head.bias"].double(),
                      "logits", ATOL, RTOL)


def test_review_fixes_memory_points_weights_families_and_preprocessing(tmp_path):
    """feature_bytes is the bytes extract returns for every CNN point (a ResNet at a size that is no multiple of
    32, whose strided convolutions round up; ConvNeXt's downsampling); a pooled module is no point; weights ignores
    BatchNorm statistics and needs one architecture both ways; a DDP-wrapped DINO R50 teacher loads; timm's CLIP
    ConvNeXts are LANG; transformers' ConvNeXt processor warps from 384 px; group decay is a ConvNeXt's."""
    R = sr.load_model(str(_save(tmp_path / "r.pth", resnet_params(9))), img_size=200)
    V = sr.load_model(str(_save(tmp_path / "v.pt", {"model": convnext_params(9, grn=True, layer_scale=False)})),
                      img_size=200)
    x = torch.randn(1, 3, 200, 200)
    for m in (R, V):
        for tokens in ("flat", "mean"):
            pts = sr.resolve_points(m, "all") + (["conv1", "relu"] if m is R else ["downsample_layers.2"])
            feats = sr.extract(m, x, points=pts, tokens=tokens)
            assert sr.feature_bytes(m, pts, tokens, 3) == 3 * 4 * sum(v[0].numel() for v in feats.values())
        with pytest.raises(sr.UsageError) as e:
            sr.resolve_points(m, "norm")
        T.assert_one_line(e)
    assert math.isqrt(sr.extract(R, x, points="layer4.0", tokens="all")["layer4.0"].shape[1]) == 7   # ceil(200/32)
    spatial = sr.spatial_probes(R, sr.synthetic_images(8, size=200, seed=0), max_patches=200)
    assert "position" in spatial
    a, b = resnet_params(10), resnet_params(10)
    b = {k: v * 4 if "running_var" in k else v for k, v in b.items()}
    ma, mb = (sr.load_model(str(_save(tmp_path / f"{n}.pth", P))) for n, P in (("a", a), ("b", b)))
    assert sr.weight_distance(ma, mb)["total"] == 0
    deeper = sr.load_model(str(_save(tmp_path / "d.pth", resnet_params(10, depths=(1, 2, 2, 1)))))
    for pair in ((ma, deeper), (deeper, ma)):
        with pytest.raises(sr.UsageError):
            sr.weights_analysis(list(pair), None, sr.AnalysisOptions())
    full = {"teacher": {f"module.backbone.{k}": v for k, v in a.items()} | {"module.head.mlp.0.weight": torch.ones(2)},
            "student": {}, "dino_loss": {"center": torch.zeros(1, 4)}, "epoch": 100}
    m = sr.load_model(str(_save(tmp_path / "full.pth", full)))
    assert m.family == "dino" and isinstance(m, sr.ResNet)
    cfg = dict(TIMM_RESNET_CFG, architecture="convnext_base", pretrained_cfg={"tag": "clip_laion2b"})
    assert sr._timm_hints(cfg, tmp_path)["family"] == "clip"
    pre = {"crop_pct": 0.875, "size": {"shortest_edge": 384}, "resample": 3, "image_mean": [0.5] * 3,
           "image_std": [0.5] * 3}
    assert sr._hf_preprocess(pre, tmp_path)["preprocess"]["crop_mode"] == "squash"
    assert sr.finetune_recipe("convnextv2", R).layer_decay_type == "single"
    assert sr.finetune_recipe("convnextv2", V).layer_decay_type == "group"   # no width row: the base one
    with pytest.raises(sr.UsageError):
        sr.finetune(R, sr.synthetic_images(16, size=64, seed=0, num_classes=2), epochs=1, batch_size=8,
                    layer_decay_type="group", device="cpu")


def test_the_feature_session_never_answers_for_another_input(tmp_path):
    """Within one command's feature session every answer equals a fresh extraction: two tensor sets of one name and
    shape but other images, synthetic sets of other sizes, a BatchNorm statistic changed in place, bfloat16 (not kept);
    a file deleted between two calls (no crash: the images as this command first read them) and a caller changing
    what it was given."""
    m = T.tiny_model(0, perturb=True)
    fresh = lambda model, ims, tok="cls", **k: sr.extract(model, ims, points="blocks", tokens=tok, **k)
    g = torch.Generator().manual_seed(0)
    a = sr.ImageSet(torch.rand(12, 3, 32, 32, generator=g), torch.arange(12) % 2, ["a", "b"], "x.pt")
    b = sr.dataclasses.replace(a, items=torch.rand(12, 3, 32, 32, generator=g))
    s1, s2 = sr.synthetic_images(8, size=32, seed=0), sr.synthetic_images(8, size=48, seed=0, num_classes=5)
    r = sr.load_model(str(_save(tmp_path / "r.pth", resnet_params(3))), img_size=32)
    folder = tmp_path / "imgs"
    for i in range(6):
        T.write_png(folder / "c" / f"{i}.png", np.full((40, 40, 3), 30 * i, np.uint8))
    with sr.feature_session():
        for first, second in ((a, b), (s1, s2)):
            fresh(m, first)
            got = fresh(m, second)
            with sr.feature_session(0):
                assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in fresh(m, second).items())
        before = fresh(r, s1, "mean")
        with torch.no_grad():
            r.bn1.running_var.mul_(4)
        after = fresh(r, s1, "mean")
        with sr.feature_session(0):
            assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in fresh(r, s1, "mean").items())
        assert not torch.allclose(before["layer1.0"], after["layer1.0"], atol=1e-3)
        half = fresh(r, s1, "mean", dtype="bfloat16")
        with sr.feature_session(0):
            assert all(torch.equal(half[k], v) for k, v in fresh(r, s1, "mean", dtype="bfloat16").items())   # as asked
        train, val = sr.split_train_val(s2, 0.25)
        calls = []
        real = sr._extract_many
        sr._extract_many = lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
        try:   # two subsets of one set are both kept (the second beside the first): the rest is read, not run
            for subset in (val, train, val, train):
                fresh(r, subset, "mean")
                sr.extract(r, subset, tokens="official")
        finally:
            sr._extract_many = real
        assert calls == [len(val), len(train)], calls
        ims = sr.load_images(str(folder))
        first = fresh(m, ims, "all")
        first["blocks.0"].zero_()                                    # the caller's copy, not the session's
        (folder / "c" / "5.png").unlink()
        sub = ims.subset(torch.arange(6))
        again = fresh(m, sub, "all")
        assert not sub.unreadable and len(again["blocks.0"]) == 6 and again["blocks.0"].abs().sum() > 0   # as read
