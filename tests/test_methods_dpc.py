"""DPC: stage 2 from a host run, tuned prompt P' for base names, the host's P for new ones, hard negatives."""
from __future__ import annotations

import json

import pytest
import torch

from training.methods import create_method
from training.runs import RunError

BASE = ["red", "green", "blue", "yellow", "cyan"]


def _host(backbone, name="coop", **options):
    torch.manual_seed(1)
    host = create_method(name, backbone, options or None, BASE)
    with torch.no_grad():
        for p in host.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return host.eval()


def _dpc(backbone, host, **options):
    torch.manual_seed(2)
    m = create_method("dpc", backbone, {"host": host.name, "host_options": json.dumps(host.config.to_dict()), **options}, BASE)
    m.init_from(host)
    return m.eval()


def test_starts_as_the_host_run_and_serves_p_prime_for_base_and_p_for_new(tiny_backbone):
    host = _host(tiny_backbone)
    m = _dpc(tiny_backbone, host)
    tokens = m.tokenize(BASE)
    assert torch.equal(tokens, host.tokenize(BASE)) and m.prompt_templates() == host.prompt_templates()
    assert m.logit_scale() == host.logit_scale()
    with torch.no_grad():
        out = m.text_outputs(tokens)
        want = host.class_embeddings(host.tokenize(BASE))  # the host run's own class embeddings
        torch.testing.assert_close(out["class_embeddings"], want)
        torch.testing.assert_close(out["class_embeddings_base"], want, atol=1e-6, rtol=1e-5)  # P' = P at the start
        m.mixed["ctx"].add_(0.3 * torch.randn_like(m.mixed["ctx"]))  # "train" M
        out = m.text_outputs(tokens)
        torch.testing.assert_close(out["class_embeddings"], want)  # new names: still the stage-1 prompt
        p_prime = (m.mixed["ctx"] - 0.5 * m.stage1__ctx) / 0.5
        host_tuned = _host(tiny_backbone)
        host_tuned.ctx.copy_(p_prime)
        torch.testing.assert_close(out["class_embeddings_base"], host_tuned.class_embeddings(tokens), atol=1e-6, rtol=1e-5)


def test_weight_new_and_the_mixed_base_prompt(tiny_backbone):
    host = _host(tiny_backbone)
    m = _dpc(tiny_backbone, host, weight=0.2, weight_new=0.25)
    mixed = _dpc(tiny_backbone, host, weight=0.2, base_prompt="mixed")
    with torch.no_grad():
        for x in (m, mixed):
            x.mixed["ctx"].copy_(host.ctx + 0.2)
        p_prime = (m.mixed["ctx"] - 0.8 * m.stage1__ctx) / 0.2
        torch.testing.assert_close(m.new_tensors()["ctx"], 0.25 * p_prime + 0.75 * host.ctx)
        torch.testing.assert_close(mixed.base_tensors()["ctx"], mixed.mixed["ctx"])
        torch.testing.assert_close(m.base_tensors()["ctx"], p_prime)


def test_the_gradient_on_m_is_the_gradient_on_p_prime_over_w(tiny_backbone):
    # the reference learns M: d loss / d M = (d loss / d P') / w
    host = _host(tiny_backbone)
    m = _dpc(tiny_backbone, host, weight=0.25)
    tokens = m.tokenize(BASE)
    m.text_outputs(tokens)["class_embeddings_base"].sum().backward()
    p_prime = m.tuned()["ctx"].detach().requires_grad_(True)
    probe = _host(tiny_backbone)
    probe.ctx = torch.nn.Parameter(p_prime)
    probe.class_embeddings(tokens).sum().backward()
    torch.testing.assert_close(m.mixed["ctx"].grad, probe.ctx.grad / 0.25, rtol=1e-4, atol=1e-6)
    assert m.stage1__ctx.grad is None and not m.stage1__ctx.requires_grad


def test_hard_negatives_are_ranked_non_repeating_and_filled(tiny_backbone, monkeypatch):
    m = _dpc(tiny_backbone, _host(tiny_backbone), top_k=3)
    sim = torch.tensor([[0.12, 0.5, 0.3, 0.001, 0.08], [0.6, 0.05, 0.3, 0.04, 0.01]])
    monkeypatch.setattr(m, "call_host", lambda fn, *a, tensors=None: {
        "image_outputs": {"image_embeddings": sim.log()}, "text_outputs": {"class_embeddings": torch.eye(5) / 100}}[fn])
    torch.manual_seed(0)
    negatives = m.hard_negatives(torch.zeros(2, 3, 32, 32), torch.tensor([2, 1]), m.tokenize(BASE))
    # image 0 (label 2): top-3 = 1, 2, 0 -> 1 is in the batch already, so 0, then one random fill
    assert negatives[0][0] == 0 and len(negatives[0]) == 2 and negatives[0][1] not in (0, 1, 2)
    flat = [c for hn in negatives for c in hn]
    assert len(flat) == len(set(flat)) and not set(flat) & {1, 2}  # no class twice, none of the batch's labels
    m_ref = _dpc(tiny_backbone, _host(tiny_backbone), top_k=2, reference_fill_range=True)
    peaked = torch.tensor([[0.01, 0.3, 0.6, 0.05, 0.04]]).log().expand(2, -1)  # top-2: the batch's own labels
    for model in (m_ref, m):
        monkeypatch.setattr(model, "call_host", lambda fn, *a, tensors=None: {
            "image_outputs": {"image_embeddings": peaked}, "text_outputs": {"class_embeddings": torch.eye(5) / 100}}[fn])
    drawn = set()
    for seed in range(20):  # only random fills remain; the reference's randint(1, n - 2) never draws class 0 or 4
        torch.manual_seed(seed)
        ref = m_ref.hard_negatives(torch.zeros(2, 3, 32, 32), torch.tensor([2, 1]), m.tokenize(BASE))
        assert {c for hn in ref for c in hn} <= {3}  # (a few tries, as the reference: a draw may find nothing)
        m.config = m.config.__class__(**{**m.config.to_dict(), "top_k": 2})
        drawn |= {c for hn in m.hard_negatives(torch.zeros(2, 3, 32, 32), torch.tensor([2, 1]), m.tokenize(BASE)) for c in hn}
    assert drawn <= {0, 3, 4} and drawn & {0, 4}  # the default draws from every class not in the batch


def test_negative_images_come_from_the_few_shot_pool(tiny_backbone):
    from test_methods import TensorSamples

    m = _dpc(tiny_backbone, _host(tiny_backbone))
    images = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 3, 32, 32)
    m.on_train_start(TensorSamples(images, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])))
    for _ in range(10):
        assert int(m._negative_image(3)[0, 0, 0]) in (3, 8)
    loss, logits = m.compute_loss(images[:2], torch.tensor([0, 1]), m.tokenize(BASE))
    assert logits is None and torch.isfinite(loss)
    loss.backward()
    assert m.mixed["ctx"].grad is not None


def test_maple_host_has_base_and_new_image_outputs(tiny_backbone):
    m = _dpc(tiny_backbone, _host(tiny_backbone, "maple"))
    sig = m.graph_signature()
    assert sig.image_outputs == ("image_embeddings", "image_embeddings_base") and m.capabilities.changes_image_graph
    with torch.no_grad():
        m.mixed["ctx"].add_(0.5)
        out = m.image_outputs(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(out["image_embeddings"], out["image_embeddings_base"])  # MaPLe's visual prompts follow ctx
    with pytest.raises(ValueError, match="works on the hosts coop, maple, promptsrc"):
        create_method("dpc", tiny_backbone, {"host": "cocoop"}, BASE)


def test_train_job_checks_and_records_the_init_run(exported, colour_root, tmp_path):
    from training.jobs import train_job

    coop_run, _ = exported("coop")
    spec = f"folder:{colour_root}"
    run = train_job("dpc", "test-tiny", spec, 2, 1, tmp_path / "dpc", init_run=coop_run,
                    train_options={"epochs": 1, "batch_size": 2}, progress=False)
    info = json.loads((run.path / "run.json").read_text())
    assert info["init_run"]["path"] == str(coop_run.resolve()) and info["init_run"]["method"] == "coop"
    assert json.loads(info["method_config"]["host_options"]) == json.loads((coop_run / "run.json").read_text())["method_config"]
    with pytest.raises(RunError, match="pass --init-run RUN"):
        train_job("dpc", "test-tiny", spec, 2, 1, tmp_path / "a", progress=False)
    with pytest.raises(RunError, match="another shots"):
        train_job("dpc", "test-tiny", spec, 4, 1, tmp_path / "b", init_run=coop_run, progress=False)
    maple_run, _ = exported("maple")
    with pytest.raises(RunError, match="is a maple run, but dpc was given host='coop'"):
        train_job("dpc", "test-tiny", spec, 2, 1, tmp_path / "c", init_run=maple_run,
                  method_options={"host": "coop"}, progress=False)
    with pytest.raises(RunError, match="does not start from another run"):
        train_job("coop", "test-tiny", spec, 2, 1, tmp_path / "d", init_run=coop_run, progress=False)
