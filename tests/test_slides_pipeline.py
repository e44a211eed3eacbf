"""The slide pieces together, as the slide suite will chain them: synthetic TIFFs -> OpenSlide
tiling -> feature bags -> batched ABMIL on the reference acquisition -> every acquisition's
scores -> cross-acquisition concordance."""

from __future__ import annotations

import dataclasses

import numpy as np

from pathrobust.data.bags import build_bags, load_bags
from pathrobust.data.slide_manifest import labels_of, read_slide_manifest
from pathrobust.data.slides import Tiling
from pathrobust.data.synth_slides import SynthSlidesConfig, synth_slides
from pathrobust.encoders.base import build_encoder
from pathrobust.metrics.classification import slide_metrics, slide_metrics_runs, summarise_runs
from pathrobust.metrics.concordance import cross_acquisition, score_table
from pathrobust.probes.abmil import ABMILConfig, train_abmil_runs


def test_synthetic_slides_to_concordance(tmp_path):
    cfg = SynthSlidesConfig.quick()
    data = synth_slides(tmp_path / "data", cfg, progress=False)
    man = read_slide_manifest(data / "manifest.csv", classes=("normal", "atypia"), robustness=True)
    paths = build_bags({r.slide_id: r.path for r in man.records}, build_encoder("rgb-histogram"), tmp_path / "bags",
                       Tiling(tile_size=112, target_mpp=0.5, max_tiles=64), progress=False)
    bags = {b.slide_id: b for b in load_bags(paths)}
    assert {len(b) for b in bags.values()} == {6} and all(b.attrs["patch_size_level0"] == 112 for b in bags.values())

    ref = cfg.reference
    parts = {split: man.select(split=split, acquisition=ref) for split in ("train", "val")}
    abmil = dataclasses.replace(ABMILConfig(), n_runs=4, max_epochs=6, patience=3)
    runs = train_abmil_runs([bags[r.slide_id].features for r in parts["train"]], labels_of(parts["train"]),
                            [bags[r.slide_id].features for r in parts["val"]], labels_of(parts["val"]), 2, abmil)
    test = man.select(split="test")  # the test specimens under every acquisition
    probs = runs.probabilities([bags[r.slide_id].features for r in test])  # (runs, slides)
    assert probs.shape == (4, len(test)) and np.isfinite(probs).all()
    on_ref = [k for k, r in enumerate(test) if r.acquisition == ref]
    per_run = [slide_metrics(labels_of(test)[on_ref], probs[i, on_ref], 2) for i in range(4)]
    assert set(summarise_runs(per_run)) >= {"balanced_accuracy_mean", "auroc_mean", "f1_sd"}
    assert slide_metrics_runs(labels_of(test)[on_ref], probs[:, on_ref], 2) == (per_run, summarise_runs(per_run))
    specimens, table = score_table([r.specimen_id for r in test], [r.acquisition for r in test], probs)
    label_of = {r.specimen_id: r.label_index for r in test}
    result = cross_acquisition(table, ref, labels=[label_of[s] for s in specimens], n_bootstrap=50)
    assert result.acquisitions == ["GV_S60", "KRH_S60"] and len(specimens) == 2
    assert -1 <= result.mean_ccc <= 1 and set(result.auc) == {"GV_S60", "KRH_S60"}
