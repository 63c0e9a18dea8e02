"""ATPrompt's attribute search: candidates from curated keywords, the weighted mixture, the alternating updates."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from training.attribute_search import AttributeMixture, combinations, keyword_candidates, search_attributes
from training.methods import create_method


def test_keyword_candidates_are_the_most_shared_keywords():
    trees = {
        "cat": {"keywords": ["cat, animal.", "cat, pet.", "cat, face."]},
        "dog": {"keywords": ["dog, animal.", "dog, pet.", "dog, dog."]},
        "cow": {"keywords": ["cow, animal.", "cow, farm."]},
        "apple": {"keywords": ["apple, fruit.", "apple, farm."], "group": ["apple, an emoji in the Food group."]},
    }
    # animal: 3 classes; farm, pet: 2 (by word); face, fruit: 1 class only -> no attribute; "dog" is the class name
    assert keyword_candidates(trees, top=5) == ["animal", "farm", "pet"]
    assert keyword_candidates(trees, top=2) == ["animal", "farm"]


def test_combinations_keep_candidate_order_and_sizes():
    assert combinations(["a", "b", "c"], [1, 2]) == [("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c")]
    assert len(combinations(list("abcde"), [3, 4, 5])) == 16  # the reference code's r > 2: 16 combinations


def test_the_mixture_is_the_softmax_weighted_sum_of_each_prompts_logits(tiny_backbone):
    names = ["red", "green", "blue"]
    prompts = [create_method("atprompt", tiny_backbone, {"attributes": a}, names) for a in (("color",), ("shape",))]
    mix = AttributeMixture(prompts)
    with torch.no_grad():
        mix.alpha.copy_(torch.tensor([0.3, -0.4]))
        feats = torch.randn(4, tiny_backbone.embed_dim)
        tokens = [m.tokenize(names) for m in prompts]
        w = torch.tensor([0.3, -0.4]).softmax(0)
        want = w[0] * prompts[0].logits_from_features(feats, tokens[0]) + w[1] * prompts[1].logits_from_features(feats, tokens[1])
        torch.testing.assert_close(mix.logits(feats, tokens), want)
    assert {id(p) for p in mix.prompt_parameters()}.isdisjoint({id(mix.alpha)})


def test_search_runs_alternating_updates_and_proposes_the_heaviest(colour_spec):
    result = search_attributes("test-tiny", colour_spec, ["color", "shape", "size"], sizes=(1, 2), shots=2, epochs=2,
                               batch_size=4)
    assert len(result.combinations) == 6 and len(result.history) == 2
    assert sum(result.weights) == pytest.approx(1.0)
    assert result.weights != [1 / 6] * 6  # alpha moved from uniform
    assert result.proposal == result.combinations[max(range(6), key=result.weights.__getitem__)]
    ranking = result.to_dict()["ranking"]
    assert ranking[0]["attributes"] == list(result.proposal) and ranking[0]["weight"] >= ranking[-1]["weight"]


def test_cli_prints_the_proposal_and_writes_the_ranking(colour_spec, tmp_path):
    from training.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["atprompt-search", "--backbone", "test-tiny", "--dataset", colour_spec, "--candidates", "color,shape",
                   "--sizes", "1,2", "--shots", "2", "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert f"proposal: --attributes {','.join(data['proposal'])}" in out.getvalue()
    assert len(data["ranking"]) == 3


def test_cli_without_candidates_on_a_dataset_without_keywords_is_one_line(colour_spec, capsys):
    from training.cli import main

    assert main(["atprompt-search", "--backbone", "test-tiny", "--dataset", colour_spec, "--epochs", "1"]) != 0
    assert "give --candidates" in capsys.readouterr().err
