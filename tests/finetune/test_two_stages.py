"""Issue 14's "Done when", first part: stage 1 lifts the verbs, and stage 2 on its features lifts SAOA.

Run as a newcomer runs it: `featstore demo` on its full sample (192 segments, the actions' motions
at a tenth of their travel), which fine-tunes an r3d_18 verb net from random weights (6 epochs at
4 x 32), builds a store with it and one with random weights only, and trains SAOA on both. At full
travel even random-weight features separate the sample's four verbs (SAOA reaches 100 % on them),
so nothing would be left for fine-tuning to show. Measured (2026-12-07, 2 threads, 48 held-out
segments): the verb net 87.5 % top-1 (chance 25 %); SAOA 87.5 % on the store built with it against
79.2 % on the random-weight store (relation over normalised rows rescaled by their mean norm).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import demo, demo_recipe
from cli.featstore_cli import main
from featstore.samples.kitchens import VERBS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # about 100 s on an idle 2-core CPU

CHANCE = 100.0 / len(VERBS)
SEGMENT = 100.0 / 48  # one held-out segment of the full sample, in %


def test_the_full_demo_lifts_saoa_with_the_stage_1_verb_net(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "demo"), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "demo" / demo.MARKER).read_text())["metrics"]

    verb_net = metrics[demo_recipe.VERBNET]["verb_top1"]
    assert verb_net >= CHANCE + 40, f"the verb net reached {verb_net} % (chance {CHANCE} %)"  # measured 87.5
    tuned, random = metrics["saoa"]["verb_top1"], metrics["saoa-random"]["verb_top1"]
    # Measured 87.5 against 79.2: four of the 48 segments; the margin is three.
    assert tuned >= random + 3 * SEGMENT, f"SAOA: {tuned} % on the stage-1 store, {random} % on the random one"
    # The table the demo printed says the same.
    assert f"stage 1   saoa    {tuned:>14.1f}" in result.output
