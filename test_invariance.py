"""End-to-end invariance tests for issue 19: a model's numbers must not depend on what runs beside it, on the order of
the files in a folder, on the number of processes, on a warm cache, or on how a release file is named.

Each test compares a command's output with an independent computation (features of each model extracted alone,
numpy CKA of them, single-image extraction) or with the same command under a change that must not matter, on tiny
official-layout checkpoints (test_ssl_repsim's builders) and class-sorted image folders written with Pillow.

  test                                              guards issue 19 item
  test_item1_cka_transpose_and_alone                1  per_model fed every model the last model's preprocessing
  test_item1_extract_many_equals_alone[*]           1  (the API: extract_many beside a model of another
                                                       normalisation, and of another input size, in either order)
  test_item2_minibatch_cka_folder_order             2  minibatch CKA read class folders class by class
  test_item3_torchrun_lost_batch_rows_and_knn       3  torchrun interleaved rows when a rank lost a whole batch
  test_item4_warm_cache_equals_cold[*]              4  the feature-cache key left out --num-heads, --act, an edited
                                                       config.json and a replaced weights shard
  test_item8_release_file_and_family_spec           8  a release file passed by path lost its family; FAMILY:SPEC

Models: A = DINO weights (flat file, ImageNet mean/std, 32 px, width 32, depth 2), B = BEiT (0.5/0.5, 48 px,
width 48, depth 3), M = MAE (ImageNet mean/std, 32 px, width 48, depth 3). Files are renamed to neutral names
(except in item 8's test) so that recognising release file names (item 8's fix) cannot change the other tests. Items 2
and 4 pair M with A (one preprocessing) so that they fail for their own bug, not item 1's.

What the tests assume of the fixes: cka.json's meta records the minibatch order under a key naming an order
(`batch_order`); a sample id is the path relative to the folder and the file's sha256 prefix; `FAMILY:PATH` in
load_model and every command; report.json's meta.models[i] has `family` and `objective`, and the overview's readings say "across
REC and JE". All tests fail on 0e96e54 and pass on 4672fa1.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ssl_repsim as sr
import test_ssl_repsim as T

ATOL = 1e-5
HEADS = ["--num-heads", 2]   # the tiny flat files do not say their head count
FAST = ["--workers", 0, "--device", "cpu", "--quiet"]


# --- images -----------------------------------------------------------------------------------------------------------

PALETTE = [(220, 40, 30), (30, 60, 220), (40, 200, 60), (230, 220, 40), (200, 40, 210), (20, 200, 210)]


def class_image(k: int, rng, hw=(40, 52)) -> np.ndarray:
    """A noisy image of class k: the class's colour and a class-specific stripe pattern (the classes differ
    strongly, so a batch of one class holds far less variation than a random batch)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    pattern = [(yy // 4) % 2, (xx // 4) % 2, ((yy + xx) // 5) % 2, ((yy // 6) + (xx // 6)) % 2][k % 4]
    base = np.array(PALETTE[k % len(PALETTE)], dtype=np.float64)
    img = base[None, None, :] * (0.55 + 0.45 * pattern[..., None]) + rng.normal(0, 25, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def class_images(classes=4, per=16, seed=0) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {k: [class_image(k, rng) for _ in range(per)] for k in range(classes)}


def write_class_folder(root: Path, imgs: dict, names=None) -> Path:
    """root/<class name>/<i>.png; names[k] is class k's folder name (default c0, c1, ...)."""
    for k, ims in imgs.items():
        for i, a in enumerate(ims):
            T.write_png(root / (names[k] if names else f"c{k}") / f"{i:03d}.png", a)
    return root


def write_flat_shuffled(root: Path, imgs: dict, seed=1) -> Path:
    """The same images in one folder under random names: sorted order is a random order of the classes."""
    flat = [a for k in sorted(imgs) for a in imgs[k]]
    perm = np.random.default_rng(seed).permutation(len(flat))
    for name_rank, i in enumerate(perm):
        T.write_png(root / f"img_{name_rank:03d}.png", flat[i])
    return root


# --- models -----------------------------------------------------------------------------------------------------------

def model_file(tmp: Path, layout: str, name: str, **arch) -> Path:
    """A tiny official-layout checkpoint, renamed to a neutral `name` (+ its suffix) in a folder of its own."""
    d = tmp / f"model_{name}"
    d.mkdir()
    case = T.build(layout, d, **arch)
    if case.path.is_dir():
        return case.path
    new = d / (name + "".join(case.path.suffixes))
    case.path.rename(new)
    return new


def dino_a(tmp):   # ImageNet mean/std, 32 px, width 32, depth 2
    return model_file(tmp, "dino", "a_dino")


def beit_b(tmp, grid=6):   # 0.5/0.5, 48 px (grid 6 of 8-px patches), width 48, depth 3
    return model_file(tmp, "beit", f"b_beit{grid}", grid=grid, D=48, mlp=96, depth=3)


def mae_m(tmp):   # ImageNet mean/std (as A), 32 px, width 48, depth 3
    return model_file(tmp, "mae", "m_mae", D=48, mlp=96, depth=3)


def load(path, **kw):
    return sr.load_model(path, num_heads=2, progress=False, **kw)


# --- CLI ------------------------------------------------------------------------------------------------------------------

def run_ok(*argv):
    p = T.cli(*argv)
    assert p.returncode == 0, f"{' '.join(map(str, argv[:3]))} ... exit {p.returncode}: {p.stderr[-1500:]}"
    return p


def cka_json(out: Path) -> dict:
    return json.loads((out / "cka.json").read_text())


def arr(doc, key="cka"):
    return np.array(doc[key], dtype=np.float64)


def alone_features(path, images, tokens="flat", points="blocks"):
    """Each model's features from a run of its own (nothing beside it)."""
    return sr.extract(load(path), images, points, tokens, batch_size=8, device="cpu")


def find_keys(obj, words) -> list[str]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if any(w in str(k).lower() for w in words) and v not in (None, "", False):
                found.append(k)
            found += find_keys(v, words)
    return found


# ======================================================================================================================
# item 1: a model's features do not depend on the models beside it
# ======================================================================================================================

def test_item1_cka_transpose_and_alone(tmp_path):
    """`cka A B` = (`cka B A`)ᵀ = numpy CKA of each model's features extracted alone = `cka` of the two feature files
    written by `extract`, for A and B of different normalisation, input size, width and depth."""
    data = write_class_folder(tmp_path / "data", class_images(classes=4, per=6))
    a, b = dino_a(tmp_path), beit_b(tmp_path)
    common = ["--data", data, "--estimator", "debiased", "--ci", 0, *HEADS, *FAST]
    run_ok("cka", a, b, *common, "--out", tmp_path / "ab")
    run_ok("cka", b, a, *common, "--out", tmp_path / "ba")
    ab, ba = cka_json(tmp_path / "ab"), cka_json(tmp_path / "ba")
    assert arr(ab).shape == (2, 3) and arr(ba).shape == (3, 2)

    images = sr.load_images(data)
    ref = T.naive_cka_map(alone_features(a, images), alone_features(b, images), debiased=True)
    np.testing.assert_allclose(arr(ab), ref, atol=ATOL, err_msg="cka A B differs from CKA of A and B extracted alone")
    np.testing.assert_allclose(arr(ba), ref.T, atol=ATOL, err_msg="cka B A differs from CKA of B and A extracted "
                                                                  "alone")
    np.testing.assert_allclose(arr(ab), arr(ba).T, atol=ATOL, err_msg="cka A B is not the transpose of cka B A")

    fa, fb = tmp_path / "fa.safetensors", tmp_path / "fb.safetensors"
    ex = ["--data", data, "--tokens", "flat", *HEADS, *FAST]
    run_ok("extract", a, *ex, "--out", fa)
    run_ok("extract", b, *ex, "--out", fb)
    run_ok("cka", fa, fb, "--estimator", "debiased", "--ci", 0, "--quiet", "--out", tmp_path / "files")
    np.testing.assert_allclose(arr(cka_json(tmp_path / "files")), arr(ab), atol=ATOL,
                               err_msg="cka of the feature files extracted alone differs from cka A B")


@pytest.mark.parametrize("b_grid", [6, 4], ids=["B_48px", "B_32px"])
def test_item1_extract_many_equals_alone(tmp_path, b_grid):
    """extract_many([A, B]) and extract_many([B, A]) give each model exactly its features extracted alone, with B
    of another normalisation (0.5/0.5 vs ImageNet) and of another (48 px) or the same (32 px) input size."""
    data = write_class_folder(tmp_path / "data", class_images(classes=3, per=4))
    ma, mb = load(dino_a(tmp_path)), load(beit_b(tmp_path, grid=b_grid))
    assert (ma.input_size, mb.input_size) == (32, 8 * b_grid)
    assert ma.preprocess["mean"] != mb.preprocess["mean"]
    images = sr.load_images(data)
    alone = {id(m): sr.extract(m, images, "blocks", "flat", batch_size=4, device="cpu") for m in (ma, mb)}
    for order in ((ma, mb), (mb, ma)):
        together = sr.extract_many(list(order), images, ["blocks"] * 2, "flat", batch_size=4, device="cpu")
        for m, feats in zip(order, together, strict=True):
            who = f"{m.family} ({m.input_size} px) in extract_many {[x.family for x in order]}"
            assert list(feats) == list(alone[id(m)]), who
            for k, v in feats.items():
                assert v.shape == alone[id(m)][k].shape, f"{who} {k}: shape {tuple(v.shape)} alone " \
                                                         f"{tuple(alone[id(m)][k].shape)}"
                torch.testing.assert_close(v, alone[id(m)][k], atol=ATOL, rtol=0, msg=f"{who} {k} differs from "
                                                                                       "alone")


# ======================================================================================================================
# item 2: batch-consuming estimators must not read a folder class by class
# ======================================================================================================================

def minibatch_contains(mb: dict, ref: np.ndarray, slack=0.5):
    """Whether each entry of `ref` lies in the minibatch interval widened by `slack` × its width on either side: a
    bootstrap over 8 batches covers less than its level, and the 6 entries are checked together (over 60 seeds of
    a random batch order, 7 of 180 maps missed the plain interval somewhere, by at most 0.042, with widths 0.2-0.46;
    none missed the widened one; the class-ordered estimate misses it by more than 0.3)."""
    low, high = arr(mb, "cka_low"), arr(mb, "cka_high")
    pad = slack * (high - low)
    return (low - pad <= ref) & (ref <= high + pad)


def test_item2_minibatch_cka_folder_order(tmp_path):
    """On a class-sorted folder (4 classes × 16 very different images, batches of 8), the minibatch estimate
    contains the full-batch debiased CKA (numpy, of features extracted alone) in its interval; and neither estimator
    depends on the folder's file order: the same images under permuted class names, or in one folder under random
    names, give the same debiased map and minibatch maps whose intervals overlap."""
    imgs = class_images(classes=4, per=16)
    folders = {"sorted": write_class_folder(tmp_path / "sorted", imgs),
               "permuted names": write_class_folder(tmp_path / "permuted", imgs, names=["d", "b", "a", "c"]),
               "shuffled": write_flat_shuffled(tmp_path / "shuffled", imgs)}
    m, a = mae_m(tmp_path), dino_a(tmp_path)   # one preprocessing: item 1 cannot show here
    ref = T.naive_cka_map(alone_features(m, sr.load_images(folders["sorted"])),
                          alone_features(a, sr.load_images(folders["sorted"])), debiased=True)
    deb, mb = {}, {}
    for what, data in folders.items():
        common = [m, a, "--data", data, *HEADS, *FAST, "--batch-size", 8]
        run_ok("cka", *common, "--estimator", "debiased", "--ci", 0, "--out", tmp_path / f"deb {what}")
        run_ok("cka", *common, "--estimator", "minibatch", "--ci", 0.95, "--ci-resamples", 500,
               "--out", tmp_path / f"mb {what}")
        deb[what], mb[what] = cka_json(tmp_path / f"deb {what}"), cka_json(tmp_path / f"mb {what}")
        assert mb[what]["estimator"] == "minibatch" and mb[what]["n"] == 64
    for what in folders:   # the full-batch estimator never depended on the order (a check of the reference)
        np.testing.assert_allclose(arr(deb[what]), ref, atol=ATOL, err_msg=f"debiased CKA on the {what} folder")
    for what in folders:
        ok = minibatch_contains(mb[what], ref)
        assert ok.all(), (f"{what} folder: minibatch CKA {np.round(arr(mb[what]), 3).tolist()} with intervals "
                          f"[{np.round(arr(mb[what], 'cka_low'), 3).tolist()}, "
                          f"{np.round(arr(mb[what], 'cka_high'), 3).tolist()}] misses the full-batch debiased "
                          f"{np.round(ref, 3).tolist()} at {int((~ok).sum())} of {ok.size} layer pairs")
    for x, y in (("sorted", "permuted names"), ("sorted", "shuffled")):
        lo = np.maximum(arr(mb[x], "cka_low"), arr(mb[y], "cka_low"))
        hi = np.minimum(arr(mb[x], "cka_high"), arr(mb[y], "cka_high"))
        assert (lo <= hi).all(), f"minibatch CKA intervals on the {x} and {y} folders do not overlap"
    # the order the batches were read in is recorded (the fix names it `batch_order`; any key naming an order does)
    for what in folders:
        assert find_keys(mb[what]["meta"], ("order", "shuffl", "permut")), \
            f"{what}: cka.json meta does not record the order the minibatches were read in"


# ======================================================================================================================
# item 3: torchrun with a rank that loses a whole batch
# ======================================================================================================================

def folder_with_lost_batch(root: Path, imgs: dict, bad=range(4, 8)) -> list[Path]:
    """A class-sorted folder whose files at sorted positions `bad` (one whole batch of 4, rank 1's first under 2
    processes) are unreadable; returns the readable files."""
    write_class_folder(root, imgs)
    # shift class c0's files 4.. up by 4 places and put four corrupt files in the gap
    c0 = sorted((root / "c0").glob("*.png"))
    for p in reversed(c0[4:]):
        p.rename(p.with_name(f"{int(p.stem) + len(bad):03d}.png"))
    for i in bad:
        (root / "c0" / f"{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    files = sorted(p for p in root.rglob("*.png"))
    assert [files.index(root / "c0" / f"{i:03d}.png") for i in bad] == list(bad)
    return [p for p in files if p.read_bytes()[8:20] != b"not an image"]


def image_of_id(sample_id: str, files: list[Path]) -> Path:
    """The one file a sample id names: an id is the path relative to the folder and, after '#', the first 16 hex
    digits of the file's sha256 (checked here)."""
    rel, _, digest = sample_id.partition("#")
    hits = [p for p in files if p.as_posix().endswith("/" + rel.replace(os.sep, "/"))]
    assert len(hits) == 1, f"sample id {sample_id!r} names {len(hits)} of the readable images"
    assert hashlib.sha256(hits[0].read_bytes()).hexdigest()[:16] == digest, sample_id
    return hits[0]


def test_item3_torchrun_lost_batch_rows_and_knn(tmp_path):
    """Under torchrun (2 processes, gloo) with batch 4, where sorted positions 4-7 (rank 1's first batch) are all
    unreadable: every row of `extract`'s file holds the features of the image its sample id names (each image
    extracted alone, in this process), and `knn` equals the single-process result."""
    imgs = class_images(classes=4, per=8, seed=3)
    train = tmp_path / "train"
    good = folder_with_lost_batch(train, imgs)
    val = write_class_folder(tmp_path / "val", class_images(classes=4, per=3, seed=4))
    a = dino_a(tmp_path)
    ex = ["extract", a, "--data", train, "--tokens", "cls", "--batch-size", 4, *HEADS, *FAST]
    kn = ["knn", a, "--data", train, "--val", val, "--k", 5, "--batch-size", 4, *HEADS, *FAST]
    tool = Path(sr.__file__).resolve()
    launch = [*T.torchrun_argv(), "--standalone", "--nproc_per_node", 2, tool]
    with T.started([*launch, *ex, "--out", tmp_path / "dist.safetensors"], tmp_path / "job_extract") as job_ex, \
            T.started([*launch, *kn, "--out", tmp_path / "knn_dist"], tmp_path / "job_knn") as job_kn:
        run_ok(*kn, "--out", tmp_path / "knn_single")   # meanwhile, in this process
        ref = {}
        m = load(a)
        for p in good:   # each image alone: its features cannot depend on batching or gathering
            one = sr.ImageSet([p], None, [], str(train))
            ref[p] = sr.extract(m, one, "blocks", "cls", batch_size=1, device="cpu")
        dist_ex, dist_kn = job_ex(timeout=240), job_kn(timeout=240)
    for p in (dist_ex, dist_kn):
        assert p.returncode == 0, p.stderr[-3000:]
    feats, ids, _ = sr.read_features(tmp_path / "dist.safetensors")
    ids = [image_of_id(i, good) for i in ids]
    single = json.loads((tmp_path / "knn_single" / "knn.json").read_text())
    dist_doc = json.loads((tmp_path / "knn_dist" / "knn.json").read_text())
    acc = {layer: r["top1"] for layer, r in next(iter(single["results"].values())).items()}
    assert max(acc.values()) == 1.0, f"the classes should be k-NN separable in one process: {acc}"
    assert sorted(ids) == sorted(ref), "the torchrun feature file does not hold one row per readable image"
    assert dist_doc["meta"]["n_train"] == single["meta"]["n_train"] == len(good)
    problems = []
    wrong = [i for r, i in enumerate(ids)
             if not all(torch.allclose(feats[k][r], ref[i][k][0], atol=ATOL, rtol=0) for k in ref[i])]
    if wrong:
        problems.append(f"extract: {len(wrong)} of {len(ids)} rows hold another image's features than their id's "
                        f"({[str(p.relative_to(train)) for p in wrong[:3]]} ...)")
    if dist_doc["results"] != single["results"]:
        got = {layer: r["top1"] for layer, r in next(iter(dist_doc["results"].values())).items()}
        problems.append(f"knn top-1 under torchrun {got}, in one process {acc}")
    assert not problems, "; ".join(problems)


# ======================================================================================================================
# item 4: a warm cache equals a cold run after the model changes
# ======================================================================================================================

def hf_folder(tmp: Path, name: str, shards: int = 1) -> Path:
    """A transformers ViTModel folder (config.json; no preprocessor config, so its preprocessing and 32 px input
    are A's), its weights in `shards` safetensors shards with an index."""
    from safetensors.torch import load_file, save_file
    d = tmp / name
    d.mkdir()
    folder = T.build("hf_vit", d).path
    (folder / "preprocessor_config.json").unlink()
    if shards > 1:
        sd = load_file(str(folder / "model.safetensors"))
        keys = sorted(sd)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in keys[s::shards]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def change_act(ctx):
    ctx["opts"] = ["--act", "silu"]


def change_heads(ctx):
    ctx["opts"] = ["--num-heads", 4]   # A (width 32) and M (width 48) both take 4 heads


def edit_config(ctx):
    cfg_path = ctx["models"][0] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(hidden_act="quick_gelu", layer_norm_eps=0.5)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def replace_shard(ctx):
    """Shard 2 of the folder replaced in place by the same tensors (same names and shapes) with other values."""
    from safetensors.torch import load_file, save_file
    shard = ctx["models"][0] / "model-00002-of-00002.safetensors"
    sd = load_file(str(shard))
    g = torch.Generator().manual_seed(7)
    save_file({k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in sd.items()}, str(shard),
              metadata={"format": "pt"})


CHANGES = {"num_heads": ("flat", change_heads), "act": ("flat", change_act), "config_json": ("folder", edit_config),
           "replaced_shard": ("sharded", replace_shard)}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_item4_warm_cache_equals_cold(tmp_path, change):
    """A run with a warm --cache after `change` equals a cold run (no cache) after it, and the change does change
    the numbers (so a stale cache would show)."""
    kind, apply = CHANGES[change]
    data = write_class_folder(tmp_path / "data", class_images(classes=4, per=5))
    a = dino_a(tmp_path)
    first = {"flat": lambda: mae_m(tmp_path), "folder": lambda: hf_folder(tmp_path, "vit"),
             "sharded": lambda: hf_folder(tmp_path, "vit", shards=2)}[kind]()
    ctx = {"models": [first, a], "opts": []}
    cache = tmp_path / "cache"

    def cka(tag, *extra):
        run_ok("cka", first, a, "--data", data, "--estimator", "debiased", "--ci", 0, *HEADS, *FAST, *extra,
               *ctx["opts"], "--out", tmp_path / tag)
        return arr(cka_json(tmp_path / tag))

    before = cka("before", "--cache", cache)           # fills the cache
    apply(ctx)
    cold = cka("cold")
    assert np.abs(cold - before).max() > 1e-3, f"{change} does not change the numbers: the test would prove nothing"
    warm = cka("warm", "--cache", cache)
    np.testing.assert_allclose(warm, cold, atol=ATOL, err_msg=f"after {change}, the warm cache gave stale features "
                                                              f"(before the change: {np.round(before, 4).tolist()})")


# ======================================================================================================================
# item 8: a release file by path keeps its identity; FAMILY:SPEC names one model's family
# ======================================================================================================================

def test_item8_release_file_and_family_spec(tmp_path):
    """A tiny DINO saved as `dino_vitbase16_pretrain.pth` loads as family dino; `dino:PATH` names the family of a
    file whose name says nothing, in load_model and in `cka`; `report` with the MAE release file (or the registered
    name `mae`) and either DINO places DINO among the joint-embedding (JE) models, MAE among the REC ones. (The tiny
    stand-ins are narrower than ViT-B: only the family and the objective grouping are asserted.)"""
    data = write_class_folder(tmp_path / "data", class_images(classes=4, per=4))
    d = tmp_path / "release"
    d.mkdir()
    released = T.build("dino", d).path.rename(d / "dino_vitbase16_pretrain.pth")
    plain = shutil.copy(released, tmp_path / "my_dino.pth")
    mae = model_file(tmp_path, "mae", "mae_pretrain_vit_base", D=48, mlp=96, depth=3)
    assert mae.name == "mae_pretrain_vit_base.pth"
    wd = tmp_path / "weights"
    wd.mkdir()
    shutil.copy(mae, sr.registry_path("mae-vitb16", wd))
    pin = ["--img-size", 32, *HEADS]   # the tiny files' own size and heads, whatever a registry row says

    assert load(plain, img_size=32).family == "unknown"   # nothing names it: the keys cannot tell DINO
    assert load(released, img_size=32).family == "dino", "the released file name should give the family"
    assert load(f"dino:{plain}", img_size=32).family == "dino", "dino:PATH should give the family"

    run_ok("cka", mae, f"dino:{plain}", "--data", data, "--ci", 0, *pin, *FAST, "--out", tmp_path / "cka")
    fams = [m["family"] for m in cka_json(tmp_path / "cka")["meta"]["models"]]
    assert fams == ["mae", "dino"], fams

    skip = "gap,info,invariance,attention,spatial,weights,agreement"
    for tag, models in (("files", [mae, released]), ("spec", ["mae", f"dino:{plain}"])):
        out = tmp_path / f"report_{tag}"
        run_ok("report", *models, "--data", data, "--skip", skip, "--weights-dir", wd, "--offline", *pin, *FAST,
               "--ci-resamples", 100, "--out", out)
        doc = json.loads((out / "report.json").read_text())
        got = [(m["family"], m["objective"]) for m in doc["meta"]["models"]]
        assert got == [("mae", "REC"), ("dino", "JE")], f"report {tag}: {got}"
        readings = " ".join(doc["overview"]["readings"])
        assert "across REC and JE" in readings, f"report {tag}: {readings[:400]}"
