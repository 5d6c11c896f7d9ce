"""The grid file of `heads ablate`: base and run tables, switches, seeds, and what is refused up front."""
from __future__ import annotations

from pathlib import Path

import pytest

from heads.grid import GridError, load_grid, parse_grid
from heads.results import switch_label
from heads.trainer import TrainConfig

TRAIN = "participant_id <= 'P25'"


def test_grid_file_format(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(
        "[base]\n"
        f"train_where = \"{TRAIN}\"\n"
        "epochs = 2\n"
        "lr_steps = [2]\n"
        "no_gating = true\n"
        "seeds = [0, 1]\n"
        "[[run]]\n"
        "name = \"saoa\"\n"
        "[[run]]\n"
        "name = \"sap-no-relation\"\n"
        "model = \"sap\"\n"
        "switches = { relation = false }\n"
        "gating = true\n"
        "[[run]]\n"
        "name = \"global\"\n"
        "model = \"global\"\n"
        "seed = 7\n")
    grid = load_grid(path, device="cpu")
    assert [r.name for r in grid.runs] == ["saoa/seed0", "saoa/seed1", "sap-no-relation/seed0",
                                           "sap-no-relation/seed1", "global"]
    assert [r.method for r in grid.runs] == ["saoa", "saoa", "sap-no-relation", "sap-no-relation", "global"]
    saoa, sap, global_run = grid.runs[1].config, grid.runs[2].config, grid.runs[4].config
    assert saoa == TrainConfig(train_where=TRAIN, epochs=2, lr_steps=(2,), switches={"gating": False}, seed=1)
    # The run's own switches override the base's; base switches skip heads that lack them.
    assert sap.model == "sap" and sap.switches == {"gating": True, "relation": False}
    assert global_run.switches == {} and global_run.seed == 7
    assert switch_label("saoa", saoa.switches) == "no gating"
    assert switch_label("sap", sap.switches) == "no relation"
    assert switch_label("global", {}) == "-"


@pytest.mark.parametrize("data, message", [
    ({"run": [{"name": "a", "lr_rate": 1}]}, "unknown key 'lr_rate'"),
    ({"run": [{"name": "a"}, {"name": "a"}]}, "duplicate run name"),
    ({"run": [{"name": "a", "seed": 1, "seeds": [1, 2]}]}, "either seed or seeds"),
    ({"run": [{"name": "../up"}]}, "needs a name"),
    ({"run": [{"name": "a", "gating": False, "no_gating": False}]}, "set twice"),
    ({"run": [{"name": "a", "seeds": [1, 1]}]}, "repeat"),
    ({"base": {}, "run": []}, "no runs"),
    ({"runs": [{"name": "a"}]}, "unknown top-level"),
])
def test_malformed_grids_are_refused_up_front(data: dict, message: str) -> None:
    with pytest.raises(GridError, match=message):
        parse_grid(data)
