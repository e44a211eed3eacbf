"""PathoROB readers (hub parquet layout, PathoROB metadata views, generic manifest), the
synthetic generator read back by the real reader, and evaluate_pathorob end to end."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pathrobust.data import pathorob as D
from pathrobust.errors import UserError


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, rows: list[dict], shards: int = 1, drop: str | None = None) -> None:
    """PathoROB hub layout: data/train-0000i-of-0000n.parquet, HF Image struct, the five
    metadata columns; row groups of 4 so reads cross groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        *[(c, pa.string()) for c in D.METADATA_COLUMNS if c != drop]])
    (folder / "data").mkdir(parents=True)
    for s, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        table = pa.Table.from_pylist([{k: v for k, v in rows[i].items() if k != drop} for i in part], schema=schema)
        pq.write_table(table, folder / "data" / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=4)


def hub_rows(centres=("RUMC", "UMCU", "CWZ"), ood=("CWZ",), slides=3, per_slide=2):
    rows, v = [], 0
    for c in centres:
        for b in ("normal", "tumor"):
            for s in range(slides):
                for p in range(per_slide):
                    rows.append({"image": {"bytes": png(v % 256), "path": f"{v}.png"}, "subset": "OOD" if c in ood else "ID",
                                 "slide_id": f"{c}_{b}_{s}", "patch_id": str(1000 + v), "biological_class": b,
                                 "medical_center": c})
                    v += 1
    return rows


def as_csv(rows: list[dict], path, subset=None) -> pd.DataFrame:
    df = pd.DataFrame([{c: r[c] for c in D.METADATA_COLUMNS} for r in rows])
    if subset is not None:
        df["subset"] = subset
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df


def test_camelyon_layout_views_and_tiles(tmp_path):
    rows = hub_rows()
    write_shards(tmp_path / "PathoROB-camelyon", rows)
    with pytest.raises(UserError, match="camelyon_reduced.csv, a stored sample that is not on the hub"):
        D.read_pathorob(tmp_path)
    reduced = [r for r in rows if r["subset"] == "ID"][::2][::-1]  # a sample, in its own order
    as_csv(reduced, tmp_path / "metadata" / "camelyon_reduced.csv")
    data = D.read_pathorob(tmp_path)["camelyon"]
    assert data.sources == {"ri": "parquet", "apd": "parquet",
                            "clustering": str(tmp_path / "metadata" / "camelyon_reduced.csv")}
    ri, apd, clus = data.view("ri"), data.view("apd"), data.view("clustering")
    assert len(ri) == 24 and (ri.subset == "ID").all()  # the OOD centre leaves RI
    assert len(apd) == 36 and set(apd.subset) == {"ID", "OOD"}
    assert list(clus.patch_id) == [r["patch_id"] for r in reduced]  # the CSV's order, joined to the rows
    assert (data.table.loc[clus.row, "patch_id"].to_numpy() == clus.patch_id.to_numpy()).all()
    assert len(data.tiles) == 36 and data.tiles.tile_ids[5] == f"{rows[5]['slide_id']}-{rows[5]['patch_id']}"
    tiles = pickle.loads(pickle.dumps(data.tiles))  # picklable for DataLoader workers
    for i in (0, 5, 35):
        assert tiles.read(i).shape == (8, 8, 3) and tiles.read(i)[0, 0, 0] == i % 256


def test_tcga_paired_view_across_shards(tmp_path):
    rows = hub_rows(centres=("A", "B", "C", "D"), ood=("D",))
    write_shards(tmp_path / "tcga", rows, shards=3)
    meta = tmp_path / "meta"
    id_rows = [r for r in rows if r["subset"] == "ID"]
    parts = []
    for a, b in (("A", "B"), ("A", "C"), ("B", "C")):
        sub = [r for r in id_rows if r["medical_center"] in (a, b)]
        parts.append(as_csv(sub, meta / f"_{a}{b}.csv", subset=f"{a}_{b}"))
    pd.concat(parts).to_csv(meta / "tcga_2x2.csv", index=False)
    as_csv(rows, meta / "tcga_4x4.csv")
    data = D.read_pathorob(tmp_path, ["tcga"], metadata_dir=meta)["tcga"]
    ri = data.view("ri")
    assert len(ri) == 3 * 24 and sorted(ri.subset.unique()) == ["A_B", "A_C", "B_C"]
    assert ri.row.value_counts().max() == 2  # a patch in two subsets is two occurrences
    row = int(ri.row.iloc[-1])
    assert data.tiles.read(row)[0, 0, 0] == row % 256  # right pixels through the shard/row-group index


def test_hub_cache_layout_and_dataset_names(tmp_path):
    snap = tmp_path / "datasets--bifold-pathomics--PathoROB-tolkach_esca" / "snapshots" / "c42219a"
    write_shards(snap, hub_rows(centres=("X", "Y"), ood=()))
    assert D.find_datasets(tmp_path) == {"tolkach_esca": snap}
    odd = tmp_path.parent / (tmp_path.name + "-odd") / "mydata"
    write_shards(odd, hub_rows())
    with pytest.raises(UserError, match="cannot tell which PathoROB dataset"):
        D.find_datasets(odd)
    assert D.find_datasets(odd, ["camelyon"]) == {"camelyon": odd}
    with pytest.raises(UserError, match="no PathoROB dataset tcga found"):
        D.find_datasets(tmp_path, ["tcga"])


def test_bad_hub_and_view_files_are_one_line_user_errors(tmp_path):
    write_shards(tmp_path / "PathoROB-camelyon", hub_rows(), drop="medical_center")
    with pytest.raises(UserError, match=r"train-00000-of-00001.parquet: missing column\(s\) medical_center"):
        D.read_pathorob(tmp_path)
    rows = hub_rows()
    root = tmp_path / "two"
    write_shards(root / "PathoROB-camelyon", rows)
    bad = as_csv(rows[:4], root / "metadata" / "camelyon_reduced.csv").drop(columns=["slide_id"])
    bad.to_csv(root / "metadata" / "camelyon_reduced.csv", index=False)
    with pytest.raises(UserError, match=r"camelyon_reduced.csv: missing column\(s\) slide_id"):
        D.read_pathorob(root)
    stray = as_csv(rows[:4], root / "metadata" / "camelyon_reduced.csv")
    stray.loc[2, "patch_id"] = "999999"
    stray.to_csv(root / "metadata" / "camelyon_reduced.csv", index=False)
    with pytest.raises(UserError, match="row 2 .*patch_id 999999.* not in the dataset's parquet"):
        D.read_pathorob(root)
    dup = root.parent / "dup"
    write_shards(dup / "PathoROB-camelyon", rows + rows[:1])
    with pytest.raises(UserError, match="occurs twice"):
        D.read_pathorob(dup)


def test_manifest_reader(tmp_path):
    for i in range(8):
        Image.fromarray(np.full((6, 6, 3), 10 * i, np.uint8)).save(tmp_path / f"t{i}.png")
    rows = [{"path": f"t{i}.png", "label": ("a", "b")[i % 2], "centre": ("H1", "H2", "H3")[i // 3],
             "case_id": f"c{i // 2}", "subset": "OOD" if i >= 6 else "ID"} for i in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    data = D.read_manifest(tmp_path / "m.csv")
    assert len(data.tiles) == 8 and data.tiles.read(3)[0, 0, 0] == 30
    assert len(data.view("ri")) == 6 and len(data.view("apd")) == 8
    assert set(data.view("ri").medical_center) == {"H1", "H2"}
    paired = pd.DataFrame([{**r, "subset": s} for s in ("H1_H2", "H1_H3") for r in rows[:6]
                           if r["centre"] in s.split("_")])
    paired.to_csv(tmp_path / "paired.csv", index=False)
    pdata = D.read_manifest(tmp_path / "paired.csv")
    assert len(pdata.tiles) == 6 and len(pdata.view("ri")) == 9  # H1's three images sit in both subsets
    assert sorted(pdata.view("ri").subset.unique()) == ["H1_H2", "H1_H3"] and len(pdata.view("clustering")) == 6
    pd.DataFrame(rows).drop(columns=["centre"]).to_csv(tmp_path / "no_centre.csv", index=False)
    with pytest.raises(UserError, match="no_centre.csv: missing column 'medical_center'"):
        D.read_manifest(tmp_path / "no_centre.csv")
    rows[4]["path"] = "gone.png"
    pd.DataFrame(rows).to_csv(tmp_path / "gone.csv", index=False)
    with pytest.raises(UserError, match="gone.csv: row 4: image gone.png not found"):
        D.read_manifest(tmp_path / "gone.csv")


def structure_features(tiles: np.ndarray) -> np.ndarray:
    """A stain-robust descriptor: the histogram of local structure coherence (orientation
    order) of the optical density — blind to colour, sensitive to tissue architecture."""
    import torch

    from pathrobust.data.synth_pathorob import _gaussian_blur

    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    od = -torch.log(x.clamp_min(1 / 255)).sum(1, keepdim=True)
    g = _gaussian_blur(od, 1.0)
    gx, gy = (g[..., :, 1:] - g[..., :, :-1])[..., :-1, :], (g[..., 1:, :] - g[..., :-1, :])[..., :, :-1]
    jxx, jyy, jxy = (_gaussian_blur(v, 4.0) for v in (gx * gx, gy * gy, gx * gy))
    coh = torch.sqrt(((jxx - jyy) ** 2 + 4 * jxy ** 2).clamp_min(0)) / (jxx + jyy + 1e-6)
    return torch.stack([torch.histc(c, bins=16, min=0, max=1) for c in coh]).double().numpy()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from pathrobust.data.synth_pathorob import SynthPathorobConfig, synth_pathorob

    out = tmp_path_factory.mktemp("synth") / "pathorob"
    config = SynthPathorobConfig(slides_per_cell=5, ood_slides_per_cell=1, patches_per_slide=3, tile_size=96)
    return synth_pathorob(out, config), config


def test_synthetic_data_reads_with_the_real_reader(synthetic):
    from pathrobust.data.synth_pathorob import CLASSES, cell_slides

    path, config = synthetic
    data = D.read_pathorob(path)["synthetic"]
    assert json.loads((path / "pathorob.json").read_text())["dataset"] == "synthetic"
    t = data.table
    assert len(t) == (2 * 2 * 5 + 2) * 3 and set(t.biological_class) == set(CLASSES)
    assert set(t.medical_center) == {"GIV_AT2", "HR_SQ", "LM_P"} and set(t[t.subset == "OOD"].medical_center) == {"LM_P"}
    assert (t.groupby("slide_id").size() == 3).all()
    assert (t.groupby("slide_id")[["biological_class", "medical_center"]].nunique() == 1).all().all()
    assert data.tiles.read(0).shape == (96, 96, 3)
    assert len(data.view("ri")) == 60 and len(data.view("apd")) == 66
    skew = cell_slides(type(config)(correlation=0.5, slides_per_cell=5))
    assert skew[("GIV_AT2", "isotropic")] == 15 and skew[("GIV_AT2", "fibrous")] == 5  # phi = (15-5)/(15+5)


def test_synthetic_rgb_histogram_is_not_robust_structure_is(synthetic, tmp_path):
    from pathrobust.encoders.base import build_encoder
    from pathrobust.extract import extract_features, load_features
    from pathrobust.metrics.pathorob import robustness

    path, _ = synthetic
    data = D.read_pathorob(path)["synthetic"]
    enc = build_encoder("rgb-histogram", weights="random")
    feats = load_features(extract_features(enc, data.tiles, tmp_path / "rgb.h5", progress=False)).features
    rgb = robustness(np.asarray(feats), data.view("ri"), "plain", 11).ri
    tiles = np.stack([data.tiles.read(i) for i in range(len(data.tiles))])
    structure = robustness(structure_features(tiles), data.view("ri"), "plain", 11).ri
    print("RI rgb-histogram", rgb, "structure", structure)
    assert rgb < 0.3 < 0.7 < structure


def test_evaluate_pathorob_end_to_end(synthetic):
    from pathrobust.probes.pathorob import PathorobParams, aggregate, evaluate_pathorob

    path, _ = synthetic
    data = D.read_pathorob(path)["synthetic"]
    rng = np.random.default_rng(0)
    t = data.table
    emb = np.stack([(b == "fibrous") * 2.0 * np.eye(16)[0] + (c == "HR_SQ") * np.eye(16)[1] + rng.normal(size=16)
                    for b, c in zip(t.biological_class, t.medical_center)]).astype(np.float32)
    params = PathorobParams.from_mapping({
        "ri": {"k": 5, "curve_k_max": 20, "variants": ["mari", "croma"]},
        "clustering": {"trials": 3, "k_max": 6},
        "apd": {"id_centres": ["GIV_AT2", "HR_SQ"], "ood_centres": ["LM_P"], "classes": ["isotropic", "fibrous"],
                "patches_per_slide": 3, "train_slides": [[[2 - s, 2 + s], [2 + s, 2 - s]] for s in range(2)],
                "iterations": 2}})
    result = evaluate_pathorob(emb, data.views, "synthetic", params)
    s = result.summary()
    assert 0 <= s["robustness_index"] <= 1 and s["k"] == 5 and s["queries"] == 60
    assert {"MaRI", "CRoMa", "clustering_score", "apd_id", "apd_ood"} <= set(s)
    tables = result.tables()
    assert len(tables["ri_curve"]) == 20 and len(tables["apd_accuracies"]) == 4
    assert result.provenance()["definitions"]["MaRI"] == "croma 1.0.1"
    agg = aggregate({"synthetic": result})
    assert agg["robustness_index"] == s["robustness_index"] and "apd_id_ci" in agg
    bad = emb.copy()
    bad[7] = np.nan
    with pytest.raises(UserError, match="synthetic embeddings: the embedding of row 7 contains NaN"):
        evaluate_pathorob(bad, data.views, "synthetic", params)
    with pytest.raises(UserError, match=r"missing column\(s\) view"):
        evaluate_pathorob(emb, data.views.drop(columns=["view"]), "synthetic", params)
    with pytest.raises(UserError, match="\\[ri\\] needs k"):
        PathorobParams.from_mapping({"ri": {}})
