"""Backbones, LoRA targets per architecture, and the exact bytes of what crosses the wire."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, DistilBertConfig, RobertaConfig

from fedslip import comm
from fedslip.config import make_config
from fedslip.model import GLOBAL, PRIVATE, BackboneError, TrackedModel, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def save_tiny(path, config, tokenizer):
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def lora_qv_params(layers: int, hidden: int, rank: int = 8) -> int:
    return layers * 2 * (rank * hidden + hidden * rank)


def test_tiny_payload_bytes_are_params_times_4_plus_the_safetensors_header(tokenizer):
    model = TrackedModel(make_config({"backbone": "tiny"}), tokenizer)
    payload = comm.encode(model.global_state())
    params = lora_qv_params(2, 32) + 32 * 4 + 4  # LoRA on query/value + classifier
    assert sum(t.numel() for t in model.global_params.values()) == params
    assert len(payload) == params * 4 + comm.header_bytes(payload)
    assert comm.decode(payload).keys() == model.global_state().keys()


def test_minilm_payload_bytes(tokenizer):
    model = TrackedModel(make_config({"backbone": "minilm", "precision": "fp32"}), load_tokenizer("minilm"))
    payload = comm.encode(model.global_state())
    assert len(payload) - comm.header_bytes(payload) == (lora_qv_params(6, 384) + 384 * 4 + 4) * 4 == 301_072


def test_distilbert_targets_and_full_head(tmp_path, tokenizer):
    path = save_tiny(tmp_path / "db", DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2,
                                                        hidden_dim=64, num_labels=4), tokenizer)
    shared = TrackedModel(make_config({"backbone": path}), tokenizer)
    assert shared.targets == ["q_lin", "v_lin"]
    assert not any("pre_classifier" in n for n in shared.global_params)
    full = TrackedModel(make_config({"backbone": path, "method": "dual_naive"}), tokenizer)
    assert any("pre_classifier" in n for n in full.global_params)
    assert full.private_params and not any("classifier" in n for n in full.private_params)


def test_roberta_targets(tmp_path, tokenizer):
    path = save_tiny(tmp_path / "rb", RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=4),
                     tokenizer)
    assert TrackedModel(make_config({"backbone": path}), tokenizer).targets == ["query", "value"]


def test_lora_targets_that_match_nothing(tokenizer):
    with pytest.raises(BackboneError, match=r"match no module.*linear modules are"):
        TrackedModel(make_config({"backbone": "tiny", "lora_targets": ["q_proj"]}), tokenizer)


def test_unknown_backbone_and_directory_without_model(tmp_path):
    with pytest.raises(BackboneError, match="not `minilm`, `tiny`"):
        load_tokenizer("no-such-backbone-xyz")
    with pytest.raises(BackboneError, match="no config.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(BackboneError, match="does not exist"):
        load_tokenizer("./missing/dir")


def test_the_private_track_changes_logits_only_when_active(tokenizer):
    model = TrackedModel(make_config({"backbone": "tiny", "method": "fedslip"}), tokenizer)
    model.load_private_state({n: torch.randn_like(t) for n, t in model.private_state().items()})
    batch = tokenizer(["stocks rise", "team wins"], return_tensors="pt", padding=True)
    with model.eval_mode():
        glob = model.logits(batch, (GLOBAL,))
        both = model.logits(batch, (GLOBAL, PRIVATE))
        assert not torch.allclose(glob, both), "the private track must change the logits"
        assert torch.allclose(model.logits(batch, (GLOBAL,)), glob)


@pytest.mark.parametrize("kind", ["bias", "classifier"])
def test_private_head_adds_w_h_plus_b_to_the_combined_logits_only(tokenizer, kind):
    model = TrackedModel(make_config({"backbone": "tiny", "method": "fedslip", "private_head": kind,
                                      "precision": "fp32"}), tokenizer)
    head = sorted(set(model.private_params) - model.private_lora)
    assert head == (["head.private.bias", "head.private.weight"] if kind == "classifier" else ["head.private.bias"])
    batch = tokenizer(["stocks rise", "team wins"], return_tensors="pt", padding=True)
    with model.eval_mode():
        glob = model.logits(batch, (GLOBAL,))
        assert torch.equal(model.logits(batch, (GLOBAL, PRIVATE)), glob), "zero at start (private LoRA B = 0 too)"
        torch.manual_seed(0)
        model.load_private_state({n: torch.randn_like(t) if n in head else t
                                  for n, t in model.private_state().items()})
        bias = model.private_params["head.private.bias"].detach()
        weight = (model.private_params["head.private.weight"].detach() if kind == "classifier"
                  else torch.zeros(bias.shape[0], 32))
        pooled = model.model.base_model.model.bert(**batch).pooler_output  # the classifier's input h
        expected = glob + pooled @ weight.T + bias
        assert torch.allclose(model.logits(batch, (GLOBAL, PRIVATE)), expected, atol=1e-5)
        assert torch.equal(model.logits(batch, (GLOBAL,)), glob), "global-only logits never see the private head"


def test_bad_payload_is_a_clear_error():
    with pytest.raises(comm.PayloadError, match="not valid safetensors"):
        comm.decode(b"\x00" * 5)
