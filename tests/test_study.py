"""``mls study``: a grid of pretrainings over seeds, resumable, with paired differences to MoCo-v2."""
import argparse
import json
import math
import shlex
import statistics
from pathlib import Path

import pytest
from PIL import Image

from mls.cli import main, usage_error
from mls.study import BUDGETS, grid_cells
from mls.study.grids import PAPER_K_OVER_D, SCENE_BASES, SceneBase, resolve_cell, scaled_k
from mls.study.outputs import beyond_noise, markdown, summarise_cells, write_outputs
from mls.study.runner import cell_key
from mls.train.settings import PRESETS


@pytest.mark.slow
def test_a_grid_runs_end_to_end_resumes_without_rerunning_and_writes_its_outputs(tmp_path, monkeypatch):
    args = ["study", "--grid", "table6", "--seeds", "2", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0"]
    main(args)
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["cells"].values()
    assert sorted((c["variant"], c["seed"]) for c in cells) == sorted(
        (v, s) for v in ("mocov2", "paper", "knn", "bce_pos", "bce") for s in (0, 1))
    for cell in cells:
        assert 0 < cell["scores"]["val_map"] <= 100 and 0 <= cell["scores"]["precision"] <= 1
        assert "test_map" not in cell["scores"]  # the test split is read only when asked
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("`mls study --grid table6 --seeds 2 --budget tiny`")
    assert "| paper | 2 |" in table
    Image.open(tmp_path / "results.png").verify()

    # Run again: every cell is done, so nothing pretrains.
    import mls.study.runner as run

    def refuse(**kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(run, "pretrain", refuse)
    main(args)
    assert json.loads((tmp_path / "results.json").read_text())["cells"] == results["cells"]

    # --rescore scores every finished cell again from its checkpoint, still without pretraining.
    scored = []
    monkeypatch.setattr(run, "score", lambda ckpt, *a, **k: scored.append(ckpt) or {"val_map": 50.0, "precision": 0.5})
    main([*args, "--rescore", "true"])
    cells = json.loads((tmp_path / "results.json").read_text())["cells"].values()
    assert len(scored) == 10 and all(p.name == "last.ckpt" and p.is_file() for p in scored)
    assert all(c["scores"] == {"val_map": 50.0, "precision": 0.5} for c in cells)

    # The command printed above a table is one the CLI takes (--test is a boolean option: `--test true`).
    main([*args, "--test", "true", "--rescore", "true"])
    command = (tmp_path / "results.md").read_text().splitlines()[0].strip("`")
    assert command == "mls study --grid table6 --seeds 2 --budget tiny --test true"
    main([*shlex.split(command)[1:], "--out", str(tmp_path), "--workers", "0", "--rescore", "true"])
    assert len(scored) == 30


@pytest.mark.slow
def test_an_interrupted_cell_goes_on_from_its_checkpoint(tmp_path, monkeypatch):
    import mls.study.runner as run

    seen = []
    real = run.pretrain

    def record(**kwargs):
        seen.append(kwargs["resume"])
        return real(**kwargs)

    monkeypatch.setattr(run, "pretrain", record)
    args = ["study", "--grid", "table6", "--seeds", "1", "--budget", "tiny", "--only=[paper]", "--out", str(tmp_path),
            "--workers", "0"]
    monkeypatch.setattr(run, "score", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # the first cell's pretraining finished, its scoring did not
        main(args)
    (first,) = list((tmp_path / "cells").iterdir())
    assert (first / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.undo()
    monkeypatch.setattr(run, "pretrain", record)
    main(args)
    assert seen == ["auto", "auto", "auto"]  # resume=auto: the interrupted cell went on from last.ckpt
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(c["variant"] for c in results["cells"].values()) == ["mocov2", "paper"]


def test_grids_hold_the_baseline_and_the_papers_setting_with_k_scaled_to_the_queue():
    demo = BUDGETS["demo"]
    cells = grid_cells("table8", demo)
    assert list(cells)[:2] == ["mocov2", "paper"]
    assert cells["paper"]["topk"] == round(1024 * 20 / 4096) == 5  # the demo's D = 1,024
    assert [cells[f"k{k}"]["topk"] for k in (1, 5, 20, 40)] == [1, 5, 20, 40]
    assert (cells["paper"]["extra_weight"], cells["paper"]["momentum"], cells["paper"]["dim"]) == (0.5, 0.995, 256)
    queue = grid_cells("queue", demo)
    ratio = 4096 / 118_287  # D over the number of COCO train2017 images
    assert [c["queue_size"] for k, c in queue.items() if k.startswith("D")] == \
        [round(ratio * 2000 * f) for f in (0.25, 1, 4, 16)]
    assert all(c["topk"] == max(1, round(PAPER_K_OVER_D * c["queue_size"])) for k, c in queue.items()
               if k.startswith("D"))
    # each D has its MoCo-v2 at the same D (InfoNCE's queue is D long too), kept by --only with its D
    assert all(queue[f"mocov2_{k}"] == {"method": "mocov2", "queue_size": c["queue_size"], "topk": c["topk"]}
               for k, c in queue.items() if k.startswith("D"))
    assert list(grid_cells("queue", demo, only=["D69"])) == ["mocov2", "D69", "mocov2_D69"]
    assert scaled_k(4096) == 20


def test_a_user_grid_and_a_bad_one(tmp_path):
    (tmp_path / "grid.yaml").write_text("lam1: {extra_weight: 1.0}\nbias: {logit_bias: learned, bce_balanced: false}\n")
    assert list(grid_cells(str(tmp_path / "grid.yaml"), BUDGETS["tiny"])) == ["mocov2", "paper", "lam1", "bias"]
    (tmp_path / "bad.yaml").write_text("k99: {topk: 99}\n")  # k not below the tiny budget's D = 24
    with pytest.raises(ValueError, match="topk"):
        grid_cells(str(tmp_path / "bad.yaml"), BUDGETS["tiny"])
    with pytest.raises(ValueError, match="--grid"):
        grid_cells("table99", BUDGETS["tiny"])


def test_paired_differences_and_the_two_standard_error_rule():
    def cell(variant, seed, value):
        return {"variant": variant, "seed": seed, "options": {}, "scores": {"val_map": value}}

    base, better = [70.0, 72.0, 71.0], [71.0, 73.5, 71.9]
    cells = {f"{v}{s}": cell(v, s, x) for v, xs in (("mocov2", base), ("mls", better)) for s, x in enumerate(xs)}
    cells["other"] = cell("mocov2", 0, 10.0)  # a cell of another budget in the same results.json: not this grid's
    index = {v: {s: f"{v}{s}" for s in range(3)} for v in ("mocov2", "mls")}
    (_, row) = summarise_cells({"cells": cells}, index)
    diffs = [b - a for a, b in zip(base, better)]
    assert row["diff_val_map"] == pytest.approx(diffs)
    se = statistics.stdev(diffs) / math.sqrt(3)
    assert statistics.fmean(diffs) > 2 * se and beyond_noise(diffs) == "yes, better"
    assert beyond_noise([1.0, -0.5, 0.2]) == "no" and beyond_noise([0.3]) == "–"


def test_the_test_split_once_read_is_paired_too():
    scores = {"mocov2": ([70.0, 72.0, 71.0], [60.0, 61.0, 62.0]), "lam": ([71.0, 73.0, 71.5], [61.5, 62.0, 62.2])}
    cells = {f"{v}{s}": {"variant": v, "seed": s, "options": {}, "scores": {"val_map": val[s], "test_map": test[s]}}
             for v, (val, test) in scores.items() for s in range(3)}
    index = {v: {s: f"{v}{s}" for s in range(3)} for v in scores}
    table = markdown({"cells": cells, "command": "mls study --test"}, {v: {} for v in scores}, index)
    header, _, mocov2, lam = table.splitlines()[2:6]
    assert header.endswith(
        "| Δ val mAP vs MoCo-v2 (paired) | beyond 2 SE | Δ test mAP vs MoCo-v2 (paired) | beyond 2 SE |")
    # test Δ by seed: 1.5, 1.0, 0.2 -> mean 0.9, std 0.66, 2 SE 0.76: beyond; val Δ 1.0, 1.0, 0.5 -> beyond too
    assert lam == "| lam | 3 | 71.8 ± 1.0 | 61.9 ± 0.4 | 0.8 ± 0.3 | yes, better | 0.9 ± 0.7 | yes, better |"
    assert mocov2 == "| mocov2 | 3 | 71.0 ± 1.0 | 61.0 ± 1.0 | – | – | – | – |"


def test_a_variant_with_its_own_mocov2_control_is_paired_with_it():
    scores = {"mocov2": [70.0, 72.0], "D8": [66.0, 69.5], "mocov2_D8": [65.0, 67.0], "k5": [71.0, 71.0]}
    cells = {f"{v}{s}": {"variant": v, "seed": s, "options": {}, "scores": {"val_map": x}}
             for v, xs in scores.items() for s, x in enumerate(xs)}
    index = {v: {s: f"{v}{s}" for s in range(2)} for v in scores}
    rows = {row["variant"]: row for row in summarise_cells({"cells": cells, "command": "mls study"}, index)}
    assert rows["D8"]["diff_val_map"] == pytest.approx([66.0 - 65.0, 69.5 - 67.0])  # MoCo-v2 at the same D
    assert rows["mocov2_D8"]["diff_val_map"] == pytest.approx([65.0 - 70.0, 67.0 - 72.0])  # the control vs mocov2
    assert rows["k5"]["diff_val_map"] == pytest.approx([1.0, -1.0])  # no control of its own: mocov2
    table = markdown({"cells": cells, "command": "mls study"}, {v: {} for v in scores}, index)
    assert "| D8 | 2 |" in table and "| 1.8 ± 1.1 |" in table and "`D8` to `mocov2_D8`" in table


def test_the_outputs_are_written_while_a_control_has_no_cell_yet(tmp_path):
    cells = {f"{v}{s}": {"variant": v, "seed": s, "options": {}, "scores": {"val_map": 70.0 + s, "precision": 0.7}}
             for v, seeds in (("mocov2", (0, 1)), ("D8", (0, 1)), ("mocov2_D8", (0,)), ("D16", (0,))) for s in seeds}
    index = {v: {s: f"{v}{s}" for s in range(2)} for v in ("mocov2", "D8", "mocov2_D8", "D16", "mocov2_D16")}
    table = write_outputs(tmp_path, {"cells": cells, "command": "mls study"}, {v: {} for v in index}, index)
    assert "| D8 | 2 | 70.5 ± 0.7 | 0.700 ± 0.000 | 0.0 | – |" in table  # one seed paired so far: no verdict
    assert "| D16 | 1 | 70.0 | 0.700 | – | – |" in table  # its control has no cell yet: nothing paired
    assert "| mocov2_D8 | 1 | 70.0 | 0.700 | 0.0 | – |" in table and (tmp_path / "results.png").stat().st_size > 0


def test_a_cell_is_keyed_by_the_settings_it_resolves_to():
    tiny = BUDGETS["tiny"].pretrain
    same = [cell_key({**tiny, **overrides}, 0) for overrides in
            ({}, {"mls_loss": "bce"}, {"select_from": "g", "logits_from": "z"}, {"log_every": 7})]  # defaults
    assert len(set(same)) == 1
    others = [cell_key({**tiny, "epochs": 2}, 0), cell_key(tiny, 1), cell_key({**tiny, "mls_loss": "knn"}, 0),
              cell_key({**tiny, "method": "mocov2"}, 0)]
    assert len({same[0], *others}) == 5
    assert cell_key({**tiny, "workers": 3, "save_every": 0}, 0) == same[0]  # bookkeeping, not what is learnt


def test_a_grid_keeps_its_base_when_the_demo_changes(monkeypatch, tmp_path):
    """Under --base demo-0.4 a cell on the built-in scenes is the demo's settings at λ = 1 (the base the tables in
    docs/study measured), whatever λ the demo has; with --data the paper's preset stays as it is."""
    from mls.train.settings import PRESETS, PretrainSettings

    mocov2, balanced = {"data": None, "method": "mocov2", "epochs": 32}, {"data": None, "epochs": 32}
    before = cell_key(mocov2, 0, "demo-0.4"), cell_key(balanced, 0, "demo-0.4")
    monkeypatch.setitem(PRESETS["demo"], "extra_weight", 3.0)
    assert (cell_key(mocov2, 0, "demo-0.4"), cell_key(balanced, 0, "demo-0.4")) == before  # a stored cell keeps its meaning
    assert cell_key({**balanced, "extra_weight": 1.0}, 0, "demo-0.4") == before[1] != \
        cell_key({**balanced, "extra_weight": 3.0}, 0, "demo-0.4")
    cells = grid_cells("lambda", BUDGETS["demo"])
    assert cells["lambda1"] == {"extra_weight": 1.0} and cells["mocov2"] == {"method": "mocov2"}
    assert PretrainSettings.resolve({}).model.extra_weight == 3.0  # what `mls pretrain` itself runs
    (tmp_path / "a.png").touch()
    paper = grid_cells("table6", BUDGETS["demo"], data=str(tmp_path))["bce"]
    assert cell_key({"data": str(tmp_path), **paper}, 0) == cell_key({"data": str(tmp_path), "extra_weight": 0.5}, 0)


def test_by_default_a_grid_varies_the_demo_as_it_ships(monkeypatch):
    """``mls study --budget demo`` on the built-in scenes: its base cell (no overrides) is ``mls pretrain``'s demo,
    setting by setting, and the lambda grid's λ = 0.25 is that demo itself; it follows the demo when it changes."""
    from mls.train.settings import PRESETS, PretrainSettings

    demo = PretrainSettings.resolve({}, "demo").values()
    assert demo["extra_weight"] == 0.25 and PretrainSettings.resolve({}).values() == demo  # `mls pretrain`, no --data
    budget = {**BUDGETS["demo"].pretrain, "data": None}
    base = resolve_cell(budget).values()
    assert {name: (value, demo[name]) for name, value in base.items() if value != demo[name]} == {}
    assert base.keys() == demo.keys()
    lam = grid_cells("lambda", BUDGETS["demo"])["lambda0.25"]
    assert resolve_cell({**budget, **lam}).values() == demo and cell_key({**budget, **lam}, 0) == cell_key(budget, 0)
    before = cell_key(budget, 0)
    monkeypatch.setitem(PRESETS["demo"], "extra_weight", 3.0)
    assert cell_key(budget, 0) != before  # the demo as it ships now


def test_the_base_of_mls_0_4_is_the_demo_at_lambda_1(tmp_path):
    from typing import get_args

    from mls.train.settings import PretrainSettings

    demo = PretrainSettings.resolve({}, "demo").values()
    budget = {**BUDGETS["demo"].pretrain, "data": None}
    old = resolve_cell(budget, "demo-0.4").values()
    assert {name: value for name, value in old.items() if value != demo[name]} == {"extra_weight": 1.0}
    assert cell_key(budget, 0, "demo-0.4") == cell_key({**budget, "extra_weight": 1.0}, 0)  # the lambda grid's λ = 1
    assert cell_key(budget, 0, "demo-0.4") != cell_key(budget, 0)
    assert get_args(SceneBase) == tuple(SCENE_BASES)  # what --base takes
    with pytest.raises(ValueError, match="--base"):
        resolve_cell(budget, "demo-9")
    (tmp_path / "a.png").touch()  # with --data the base is the paper's preset: no scene base to choose
    with pytest.raises(ValueError, match="--base demo-0.4"):
        grid_cells("table6", BUDGETS["demo"], data=str(tmp_path), base="demo-0.4")
    assert cell_key({"data": str(tmp_path)}, 0, None) == cell_key({"data": str(tmp_path)}, 0, "demo-0.4")
    with pytest.raises(argparse.ArgumentError) as bad:
        main(["study", "--base", "demo-9"])
    assert usage_error(bad.value) == "--base: got 'demo-9', expected one of demo, demo-0.4"


def test_stored_cells_that_name_no_base_are_found_under_the_base_of_mls_0_4(tmp_path, monkeypatch):
    """results.json from before bases were recorded: its scene cells had the demo of mls 0.4 (λ = 1), so the
    stored command with --base demo-0.4 finds every one finished, and the default base (the demo) does not find
    its MLS cell; cells a call pretrains record their base."""
    import mls.study.runner as run

    tiny = {**BUDGETS["tiny"].pretrain, "data": None}
    options = grid_cells("table6", BUDGETS["tiny"], only=["bce"])
    cells = {f"old{variant}": {"variant": variant, "seed": 0, "options": overrides, "settings": {**tiny, **overrides},
                               "run": "r", "scores": {"val_map": 60.0 + len(variant)}}
             for variant, overrides in options.items()}
    (tmp_path / "results.json").write_text(json.dumps({"cells": cells}))
    keys = set(run.load_results(tmp_path / "results.json")["cells"])
    assert keys == {cell_key({**tiny, **overrides}, 0, "demo-0.4") for overrides in options.values()}
    assert cell_key({**tiny, **options["bce"]}, 0, "demo-0.4") not in {cell_key({**tiny, **o}, 0) for o in options.values()}

    monkeypatch.setattr(run, "pretrain", lambda **kwargs: (_ for _ in ()).throw(AssertionError("ran again")))
    args = ["study", "--grid", "table6", "--only=[bce]", "--seeds", "1", "--budget", "tiny", "--out", str(tmp_path)]
    main([*args, "--base", "demo-0.4"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["cells"]) == keys and results["base"] == "demo-0.4"
    command = (tmp_path / "results.md").read_text().splitlines()[0].strip("`")
    assert command == results["command"] == "mls study --grid table6 --seeds 1 --budget tiny --base demo-0.4 --only '[bce]'"
    main(shlex.split(command)[1:] + ["--out", str(tmp_path)])  # the printed command finds them too

    pretrained = []
    monkeypatch.setattr(run, "pretrain", lambda **kwargs: pretrained.append(kwargs) or tmp_path / "last.ckpt")
    monkeypatch.setattr(run, "score", lambda *a, **k: {"val_map": 50.0, "precision": 0.5})
    monkeypatch.setattr(run, "_final_losses", lambda run_dir: {})
    main(args)  # the demo as it ships: MoCo-v2 and bce are other runs (λ enters the key); the paper's setting is not
    assert sorted(kwargs.get("mls_loss", kwargs.get("method")) for kwargs in pretrained) == ["bce", "mocov2"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["base"] == "demo" and "--base" not in results["command"]
    new = {key: cell for key, cell in results["cells"].items() if key not in keys}
    assert len(new) == 2 and all(cell["base"] == "demo" for cell in new.values())
    assert set(run.load_results(tmp_path / "results.json")["cells"]) == set(results["cells"])  # stored as keyed
    # a cell stores the demo's values written out: a later demo changes neither its key nor its meaning
    demo = {**PRESETS["demo"]}
    assert all(cell["settings"]["dim"] == 128 and cell["settings"]["momentum"] == 0.99 for cell in new.values())
    monkeypatch.setitem(PRESETS, "demo", {**demo, "dim": 64, "momentum": 0.9, "extra_weight": 0.5})
    assert set(new) <= set(run.load_results(tmp_path / "results.json")["cells"])


STORED = sorted(path.parent.name for path in (Path(__file__).parents[1] / "docs" / "study").glob("*/results.json"))


@pytest.mark.parametrize("folder", STORED)
def test_the_command_above_a_stored_table_finds_every_one_of_its_cells(folder):
    """docs/study's tables on the built-in scenes were measured on the demo of mls 0.4 (λ = 1): their commands say
    --base demo-0.4; those on a folder (--data) have no scene base. Each (variant, seed) a command asks for (with
    --only, those named and their controls) is stored under the key that command computes."""
    from mls.study.grids import BUDGETS, GRIDS, cell_options, load_budget
    from mls.study.runner import load_results

    root = Path(__file__).parents[1]
    path = root / "docs" / "study" / folder / "results.json"
    stored = json.loads(path.read_text())
    options = dict(zip(*[iter(shlex.split(stored["command"])[2:])] * 2))
    data = options.get("--data")
    base = None if data else "demo-0.4"
    assert options.get("--base") == base == stored["base"]
    grid = options["--grid"] if options["--grid"] in GRIDS else str(root / options["--grid"])
    plan = load_budget(options["--budget"] if options["--budget"] in BUDGETS else str(root / options["--budget"]))
    only = [v.strip() for v in options["--only"].strip("[]").split(",")] if "--only" in options else None
    cells = grid_cells(grid, plan, data, only, base or "demo")
    found = load_results(path)["cells"]
    for variant, overrides in cells.items():
        settings = cell_options({**plan.pretrain, "data": data, **overrides}, base)
        for seed in range(int(options["--seeds"])):
            assert cell_key(settings, seed, base) in found, (variant, seed)


def test_results_of_an_older_key_are_found_under_the_current_one(tmp_path, monkeypatch):
    import mls.study.runner as run

    tiny = {**BUDGETS["tiny"].pretrain, "data": None}
    options = {"paper": grid_cells("table6", BUDGETS["tiny"])["paper"], "mocov2": {"method": "mocov2"}}
    cells = {f"old{variant}": {"variant": variant, "seed": 0, "options": overrides, "settings": {**tiny, **overrides},
                               "run": "r", "scores": {"val_map": 60.0 + len(variant)}}
             for variant, overrides in options.items()}
    cells["gone"] = {"variant": "gone", "seed": 0, "options": {}, "settings": {"no_such_setting": 1}, "run": "r",
                     "scores": {"val_map": 1.0}}  # an option a later version dropped: kept, not fatal
    (tmp_path / "results.json").write_text(json.dumps({"cells": cells}))
    monkeypatch.setattr(run, "pretrain", lambda **kwargs: (_ for _ in ()).throw(AssertionError("ran again")))
    main(["study", "--grid", "table6", "--only=[paper]", "--seeds", "1", "--budget", "tiny", "--out", str(tmp_path),
          "--base", "demo-0.4"])  # cells that name no base: the demo of mls 0.4's
    table = (tmp_path / "results.md").read_text()
    assert "| paper | 1 | 65.0 | -1.0 | – |" in table and "| mocov2 | 1 | 66.0 | – | – |" in table
    assert "gone" in json.loads((tmp_path / "results.json").read_text())["cells"]


@pytest.mark.slow
def test_variants_of_other_grids_with_the_same_settings_reuse_a_finished_cell(tmp_path, monkeypatch):
    common = ["--seeds", "1", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0"]
    main(["study", "--grid", "table6", "--only=[bce]", *common])
    import mls.study.runner as run

    monkeypatch.setattr(run, "pretrain", lambda **kwargs: (_ for _ in ()).throw(AssertionError("ran again")))
    main(["study", "--grid", "table7", "--only=[both_queues]", *common])  # both_queues is table6's bce
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["cells"]) == 2
    assert results["grid"] == "table7"  # the file names the call that wrote it last, also when nothing ran
    assert results["command"] == "mls study --grid table7 --seeds 1 --budget tiny --only '[both_queues]'"
    table = (tmp_path / "results.md").read_text()
    assert "| both_queues | 1 |" in table and "| bce |" not in table and "| mocov2 | 1 |" in table


def test_progress_counts_only_the_cells_left_to_pretrain(tmp_path, monkeypatch, capsys):
    import mls.study.runner as run

    pretrained = []
    monkeypatch.setattr(run, "pretrain", lambda **kwargs: pretrained.append(kwargs["out"]) or tmp_path / "last.ckpt")
    monkeypatch.setattr(run, "score", lambda *a, **k: {"val_map": 50.0, "precision": 0.5})
    monkeypatch.setattr(run, "_final_losses", lambda run_dir: {})
    common = ["--seeds", "1", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0"]
    main(["study", "--grid", "table6", "--only=[bce]", *common])  # MoCo-v2 and bce: two cells
    capsys.readouterr()
    main(["study", "--grid", "table6", *common])  # five variants, two of them finished: three to run
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(pretrained) == 5
    assert [line.split(": ")[1].split(",")[0] for line in lines] == ["run 1 of 3", "run 2 of 3", "run 3 of 3"]
    assert "min left" not in lines[0] and all("min left" in line for line in lines[1:])


def test_progress_reaches_each_pretraining_and_leaves_the_cells_keys_as_they_were(tmp_path, monkeypatch):
    import mls.study.runner as run

    given = []
    monkeypatch.setattr(run, "pretrain", lambda **kwargs: given.append(kwargs) or tmp_path / "last.ckpt")
    monkeypatch.setattr(run, "score", lambda *a, **k: {"val_map": 50.0, "precision": 0.5})
    monkeypatch.setattr(run, "_final_losses", lambda run_dir: {})
    main(["study", "--grid", "table6", "--only=[bce]", "--seeds", "1", "--budget", "tiny", "--out", str(tmp_path),
          "--workers", "0", "--progress", "lines"])
    assert [kwargs["progress"] for kwargs in given] == ["lines", "lines"]
    # where a run logs and how it shows its progress are no part of what it learns
    assert cell_key({"logger": "wandb", "progress": "off", "project": "p", "run_name": "r"}, 0) == cell_key({}, 0)
