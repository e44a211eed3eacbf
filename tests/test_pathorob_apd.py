"""APD (pathrobust.probes.pathorob_apd) against a direct scikit-learn implementation of
PathoROB's protocol (apd.py, utils.py, train_model.py at commit 46594e9)."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pandas as pd
import pytest

from pathrobust.errors import UserError
from pathrobust.probes.pathorob_apd import ApdDesign, run_apd


def pathorob_split_map(dataset: str, split: int, p: int):
    """PathoROB's get_patches_map_to_split, written out."""
    if dataset == "camelyon":
        pairs = [(0, 0, (7 - split) * p), (0, 1, (7 + split) * p), (1, 0, (7 + split) * p), (1, 1, (7 - split) * p)]
        return sorted(pairs), 14
    if dataset == "tcga":
        diag = [(i, j, (split + 2) * p) for i in range(4) for j in range(4) if i == j]
        inv = [(i, j, (1 if split % 2 == 1 else (2 if split < 3 else 0)) * p) for i in range(4) for j in range(4)
               if i + j == 3]
        rest = [(i, j, (2 if split < 2 else (1 if split < 5 else 0)) * p) for i in range(4) for j in range(4)
                if i != j and i + j != 3]
        return sorted(diag + inv + rest), 8
    t0 = [(0, j, (3 - split) * p) for j in range(3)] + [(0, j, (3 + split) * p) for j in range(3, 6)]
    t1 = [(1, j, (3 + split) * p) for j in range(3)] + [(1, j, (3 - split) * p) for j in range(3, 6)]
    return sorted(t0 + t1), 6


def schedule(dataset: str, n_splits: int, centres: int, classes: int):
    """The split map as ApdDesign.train_slides (n_splits, centres, classes), from the formula."""
    out = np.zeros((n_splits, centres, classes), int)
    for s in range(n_splits):
        for i, j, n in pathorob_split_map(dataset, s, 1)[0]:
            out[s, i, j] = n
    return out.tolist()


def direct_apd(x, meta, dataset, centres_id, centres_ood, classes, n_splits, p, iterations, case_splits=None):
    """PathoROB's apd.compute: nested lists of (patch, centre, class, slide), the module-level
    random generator, the C grid by validation balanced accuracy and a refit at the best C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from threadpoolctl import threadpool_limits

    def train_lr(tx, ty, vx, vy, test_xs, test_ys):
        cs = 10 ** np.linspace(-8, 4, 15)
        results = [(c, balanced_accuracy_score(vy, LogisticRegression(C=c, random_state=0).fit(tx, ty).predict(vx)))
                   for c in cs]
        best_c, _ = max(results, key=lambda r: r[1])
        final = LogisticRegression(C=best_c).fit(tx, ty)
        return [balanced_accuracy_score(y, final.predict(xx)) for xx, y in zip(test_xs, test_ys)]

    random.seed(1000)
    mid, mood = meta[meta.subset == "ID"], meta[meta.subset == "OOD"]
    feats = [[[] for _ in classes] for _ in centres_id]
    for r in mid.itertuples():
        i, j = centres_id.index(r.medical_center), classes.index(r.biological_class)
        feats[i][j].append((x[r.row], i, j, r.slide_id))
    ood = [(x[r.row], centres_ood.index(r.medical_center), classes.index(r.biological_class), r.slide_id)
           for r in mood.itertuples()]
    seeds = random.sample(range(0, 10000), iterations)
    id_acc, ood_acc = [[] for _ in range(n_splits)], [[] for _ in range(n_splits)]
    for seed in seeds:
        random.seed(seed)
        if case_splits:
            pick = (random.randint(0, len(case_splits["train"][centres_id[0]]) - 1),
                    random.randint(0, len(case_splits["train"][centres_id[1]]) - 1))
        for i, center in enumerate(centres_id):
            if case_splits:
                test_cases = case_splits["test"][center][pick[i]]
            for j in range(len(classes)):
                chunks = [feats[i][j][k:k + p] for k in range(0, len(feats[i][j]), p)]
                random.shuffle(chunks)
                if case_splits:
                    order = [chunks[k][0][3] for k in range(len(chunks))]
                    # PathoROB iterates a set here (order varies with PYTHONHASHSEED); pathrobust sorts
                    for tc in sorted(set(test_cases) & set(order)):
                        chunks.append(chunks.pop([c[0][3] for c in chunks].index(tc)))
                feats[i][j] = [item for chunk in chunks for item in chunk]
        for split in range(n_splits):
            smap, top = pathorob_split_map(dataset, split, p)
            train = [f for i, j, n in smap for f in feats[i][j][:n]]
            val = [f for i, j, n in smap for f in feats[i][j][n:n + int(n / top)]]
            test = [f for a in range(len(centres_id)) for b in range(len(classes)) for f in feats[a][b][(top + 1) * p:]]
            tx, ty = zip(*[(f[0], f[2]) for f in train])
            vx, vy = zip(*[(f[0], f[2]) for f in val])
            sx, sy = zip(*[(f[0], f[2]) for f in test])
            ox, oy = zip(*[(f[0], f[2]) for f in ood])
            with warnings.catch_warnings(), threadpool_limits(1):  # threads are no part of the protocol
                warnings.simplefilter("ignore")
                a_id, a_ood = train_lr(np.array(tx), ty, np.array(vx), vy, [np.array(sx), np.array(ox)], [sy, oy])
            id_acc[split].append(a_id)
            ood_acc[split].append(a_ood)
    apd = lambda acc: float(np.mean((np.asarray(acc)[1:] / np.asarray(acc)[0]).mean(axis=0) - 1))  # noqa: E731
    return np.array(id_acc), np.array(ood_acc), apd(id_acc), apd(ood_acc)


def camelyon_like(p: int = 2, seed: int = 0, d: int = 8):
    """RUMC/UMCU x normal/tumor with 17 slides of p patches per cell, 2 OOD centres; slides in
    metadata order, rows of a slide consecutive (as camelyon.csv)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in ("RUMC", "UMCU"):
        for b in ("normal", "tumor"):
            rows += [("ID", f"{c}-{b}-{s}", b, c) for s in range(17) for _ in range(p)]
    for c in ("CWZ", "RST"):
        for b in ("normal", "tumor"):
            rows += [("OOD", f"{c}-{b}-{s}", b, c) for s in range(2) for _ in range(p)]
    meta = pd.DataFrame(rows, columns=["subset", "slide_id", "biological_class", "medical_center"])
    centre_fx = {c: rng.normal(size=d) for c in meta.medical_center.unique()}
    x = np.stack([(b == "tumor") * 1.0 * np.eye(d)[0] + 0.8 * centre_fx[c] + rng.normal(size=d)
                  for _, _, b, c in meta.itertuples(index=False)]).astype(np.float32)
    meta.insert(0, "row", np.arange(len(meta)))
    return x, meta


def test_apd_equals_direct_sklearn_implementation():
    x, meta = camelyon_like()
    design = ApdDesign(("RUMC", "UMCU"), ("CWZ", "RST"), ("normal", "tumor"), 2,
                       tuple(map(lambda s: tuple(map(tuple, s)), schedule("camelyon", 8, 2, 2))), iterations=2)
    got = run_apd(x, meta, design)
    id_acc, ood_acc, apd_id, apd_ood = direct_apd(x, meta, "camelyon", ["RUMC", "UMCU"], ["CWZ", "RST"],
                                                  ["normal", "tumor"], 8, 2, 2)
    np.testing.assert_allclose(got.id_accuracy, id_acc, atol=1e-6)
    np.testing.assert_allclose(got.ood_accuracy, ood_acc, atol=1e-6)
    assert got.apd_id == pytest.approx(apd_id, abs=1e-6)
    assert got.apd_ood == pytest.approx(apd_ood, abs=1e-6)
    assert got.seeds == random.Random(1000).sample(range(10000), 2)
    assert not np.allclose(got.id_accuracy, got.id_accuracy[0])  # the splits do differ


def test_apd_with_case_splits_equals_direct_implementation():
    """Tolkach-like: 2 centres x 6 classes, cases spanning classes, test cases moved last."""
    rng = np.random.default_rng(3)
    classes = ["TUMOR", "MUSC_PROP", "SH_OES", "SH_MAG", "REGR_TU", "ADVENT"]
    rows = []
    for c in ("WNS", "CHA"):
        for b in classes:
            rows += [("ID", f"{c}-case{k}", b, c) for k in rng.permutation(9) for _ in range(2)]
    for b in classes:
        rows += [("OOD", f"UKK-case{k}", b, "UKK") for k in range(2) for _ in range(2)]
    meta = pd.DataFrame(rows, columns=["subset", "slide_id", "biological_class", "medical_center"])
    meta.insert(0, "row", np.arange(len(meta)))
    x = np.stack([np.eye(8)[classes.index(b)] * 1.5 + (c == "WNS") * 0.7 + rng.normal(size=8)
                  for _, _, _, b, c in meta.itertuples(index=False)]).astype(np.float32)
    splits = {"train": {c: [[f"{c}-case{k}" for k in range(7)], [f"{c}-case{k}" for k in range(2, 9)]]
                        for c in ("WNS", "CHA")},
              "test": {c: [[f"{c}-case7", f"{c}-case8"], [f"{c}-case0", f"{c}-case1"]] for c in ("WNS", "CHA")}}
    design = ApdDesign(("WNS", "CHA"), ("UKK",), tuple(classes), 2,
                       tuple(map(lambda s: tuple(map(tuple, s)), schedule("tolkach_esca", 4, 2, 6))),
                       iterations=2, case_splits=splits)
    got = run_apd(x, meta, design)
    id_acc, ood_acc, apd_id, apd_ood = direct_apd(x, meta, "tolkach_esca", ["WNS", "CHA"], ["UKK"], classes, 4, 2, 2,
                                                  case_splits=splits)
    np.testing.assert_allclose(got.id_accuracy, id_acc, atol=1e-6)
    np.testing.assert_allclose(got.ood_accuracy, ood_acc, atol=1e-6)
    assert got.apd_id == pytest.approx(apd_id, abs=1e-6)


def test_tcga_schedule_shape():
    s = np.array(schedule("tcga", 7, 4, 4))
    assert s.shape == (7, 4, 4) and s.max() == 8
    np.testing.assert_array_equal(s[0], np.full((4, 4), 2))  # split 0 is balanced


def test_apd_bad_input_is_one_line_user_error():
    x, meta = camelyon_like()
    design = ApdDesign(("RUMC", "UMCU"), ("CWZ", "RST"), ("normal", "tumor"), 2,
                       tuple(map(lambda s: tuple(map(tuple, s)), schedule("camelyon", 8, 2, 2))), iterations=1)
    short = meta.drop(meta[(meta.medical_center == "UMCU") & (meta.biological_class == "tumor")].index[:10])
    with pytest.raises(UserError, match=r"cell \(UMCU, tumor\) has 24 ID rows; .* at least 31"):
        run_apd(x, short, design)
    with pytest.raises(UserError, match="OOD centre 'RST' is not one of"):
        run_apd(x, meta, ApdDesign(design.id_centres, ("CWZ",), design.classes, 2, design.train_slides))
    with pytest.raises(UserError, match="no OOD rows"):
        run_apd(x, meta[meta.subset == "ID"], design)
    nan = x.copy()
    nan[5, 0] = np.nan
    with pytest.raises(UserError, match="row 5 contain NaN"):
        run_apd(nan, meta, design)
    with pytest.raises(UserError, match="train_slides has shape"):
        ApdDesign.from_mapping({"id_centres": ["a", "b"], "ood_centres": ["c"], "classes": ["x", "y"],
                                "patches_per_slide": 2, "train_slides": [[[1, 1], [1, 1]]]})


def test_proposed_suite_toml_parses_and_matches_pathorob(tmp_path):
    """The proposed suites/pathorob.toml: every dataset table builds PathorobParams, and its
    APD schedules are PathoROB's get_patches_map_to_split."""
    import json
    import tomllib
    from pathlib import Path

    from pathrobust.data.synth_pathorob import SynthPathorobConfig
    from pathrobust.probes.pathorob import PathorobParams

    toml = tomllib.loads((Path(__file__).parent / "data" / "pathorob_suite_proposal.toml").read_text())
    splits = {p: {c: [["case_1"]] for c in ("VALSET2_WNS", "VALSET4_CHA_FULL")} for p in ("train", "test")}
    (tmp_path / "tolkach_splits.json").write_text(json.dumps(splits))
    expected = {"tcga": ("tcga", 7, 4, 4, 61, "paired"), "camelyon": ("camelyon", 8, 2, 2, 11, "plain"),
                "tolkach_esca": ("tolkach_esca", 4, 2, 6, 46, "plain")}
    for name, (ref, n_splits, centres, classes, k, design) in expected.items():
        params = PathorobParams.from_mapping(toml["datasets"][name], name, search=[tmp_path])
        assert params.k == k and params.design == design
        assert [list(map(list, s)) for s in params.apd.train_slides] == schedule(ref, n_splits, centres, classes)
        assert params.apd.iterations == 20 and params.apd.seed == 1000 and params.clustering.trials == 50
    assert PathorobParams.from_mapping(toml["datasets"]["tolkach_esca"], search=[tmp_path]).apd.case_splits == splits
    with pytest.raises(UserError, match="case_splits file tolkach_splits.json not found"):
        PathorobParams.from_mapping(toml["datasets"]["tolkach_esca"], search=[tmp_path / "nowhere"])
    synth = PathorobParams.from_mapping(toml["datasets"]["synthetic"])
    assert synth.variants == ("mari", "croma")
    SynthPathorobConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in toml["synthetic"].items()}).check()
    assert len(toml["leaderboard"]["published"]["H0-mini"]) == 4
    with pytest.raises(UserError, match=r"\[clustering\] has unknown key\(s\) trails"):
        PathorobParams.from_mapping({"ri": {"k": 3}, "clustering": {"trails": 5}})
