"""A finished run, loaded with the libraries people know: the merged export in plain transformers, the peft
export and the run's own adapters in plain peft, each giving ``predict``'s probabilities.

Tolerance: atol 1e-5 on softmax probabilities (fp32 everywhere; the plain models pad a whole batch and the
merged one adds LoRA into the weights, so the same math runs in another order).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, pipeline

import fedslip
from fedslip.cli import build_parser, main
from fedslip.inference import EXPORT_FORMATS, EXPORT_META, ExportError, RunModel, same_backbone, save_adapters
from fedslip.model import TINY_BERT, load_tokenizer

ATOL = 1e-5
# the last text is longer than max_seq_len: an exported tokenizer must cut it where training did
TEXTS = ["stocks profit market news", "team coach match", "war minister election today",
         "software chip internet " * 40 + "team coach match"]


def make_run(out: Path, data_dir: Path, backbone: str, **overrides) -> Path:
    cfg = fedslip.make_config({**dict(method="fedslip", backbone=backbone, data_dir=str(data_dir), num_clients=2,
                                      samples_per_client=32, test_samples_per_client=16, global_test_samples=64,
                                      batch_size=16, kstep=0, precision="fp32", private_warmup_rounds=0,
                                      max_seq_len=16), **overrides})
    fedslip.run(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny architecture as a local model directory (a user's own backbone, like the packaged MiniLM:
    the adapters name it, nothing else is saved)."""
    folder = tmp_path_factory.mktemp("backbone")
    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(BertConfig(vocab_size=len(tokenizer), num_labels=4,
                                                              **TINY_BERT)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir, tiny_dir):
    """2 rounds of fedslip, no private head; ``save_adapters`` has written the adapters (returned). The private
    track also adapts the dense layers (pooler included) and both learning rates are raised, so that it moves
    the tiny model's probabilities by far more than the tolerance."""
    out = make_run(tmp_path_factory.mktemp("runs") / "fedslip", data_dir, str(tiny_dir), rounds=2, lr=0.02,
                   private_lr=0.02, private_targets=["query", "value", "dense"])
    return out, fedslip.load_config(out / "config.toml"), save_adapters(out)


@pytest.fixture(scope="module")
def head_run(tmp_path_factory, data_dir):
    """1 round of fedslip with a private classifier head, on the ``tiny`` backbone (random weights, no files)."""
    return make_run(tmp_path_factory.mktemp("runs") / "head", data_dir, "tiny", rounds=1, private_head="classifier")


def expected(run_dir: Path, client: int, use_private: bool) -> torch.Tensor:
    return torch.tensor([p.probabilities for p in RunModel(run_dir, client, use_private).predict(TEXTS)])


def probabilities(model, tokenizer) -> torch.Tensor:
    """Softmax probabilities as a user computes them: the tokenizer's own truncation, one padded batch."""
    with torch.inference_mode():
        return model(**tokenizer(TEXTS, return_tensors="pt", padding=True, truncation=True)).logits.softmax(-1)


def load_with_peft(base_model: str, num_labels: int, global_dir: Path, private_dir: Path | None):
    """The documented recipe: plain base model, the global adapter, the private one, both active."""
    base = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, global_dir, adapter_name="global")
    if private_dir is not None:
        model.load_adapter(private_dir, adapter_name="private")
        model.base_model.set_adapter(["global", "private"])
    return model.eval()


def test_the_private_track_changes_the_predictions(run):
    """Otherwise every personalized comparison below would pass without the private adapter."""
    out, *_ = run
    assert (expected(out, 1, True) - expected(out, 1, False)).abs().max() > 1000 * ATOL


@pytest.mark.parametrize("use_private", [True, False], ids=["personalized", "global"])
def test_merged_export_gives_predicts_probabilities_in_plain_transformers(run, tmp_path, use_private):
    out, cfg, _ = run
    want = expected(out, 1, use_private)
    export = RunModel(out, 1, use_private).export(tmp_path / "merged")  # merged is the default
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.model_max_length == cfg.max_seq_len
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    torch.testing.assert_close(probabilities(model, tokenizer), want, atol=ATOL, rtol=0)
    classify = pipeline("text-classification", model=str(export), top_k=None, truncation=True, device="cpu")
    scores = [{row["label"]: row["score"] for row in rows} for rows in classify(TEXTS)]
    got = torch.tensor([[s[name] for name in cfg.class_names] for s in scores])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_private", [True, False], ids=["personalized", "global"])
def test_peft_export_gives_predicts_probabilities_in_plain_peft(run, tmp_path, use_private):
    out, cfg, _ = run
    want = expected(out, 1, use_private)
    export = RunModel(out, 1, use_private).export(tmp_path / "peft", format="peft")
    meta = json.loads((export / EXPORT_META).read_text())
    assert meta["adapters"] == (["global", "private"] if use_private else ["global"])
    assert meta["base_model"] == str(Path(cfg.backbone).resolve())
    assert (export / "private").exists() == use_private and not (export / "base").exists()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.model_max_length == cfg.max_seq_len
    model = load_with_peft(meta["base_model"], meta["num_labels"], export / "global",
                           export / "private" if use_private else None)
    torch.testing.assert_close(probabilities(model, tokenizer), want, atol=ATOL, rtol=0)
    # the README's snippet is the same recipe, runnable as written
    snippet = re.search(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(snippet, namespace)
    torch.testing.assert_close(probabilities(namespace["model"], namespace["tokenizer"]), want, atol=ATOL, rtol=0)


def test_the_runs_own_adapters_reload_with_plain_peft(run):
    out, cfg, written = run
    files = ("adapter_config.json", "adapter_model.safetensors")
    folders = [out / "adapter", *(out / "clients" / str(c) / "adapter" for c in range(cfg.num_clients))]
    assert sorted(written) == sorted(folder / f for folder in folders for f in files)
    assert {f.stat().st_mode for f in written} == {(out / "config.toml").stat().st_mode}, "a run's files share a mode"
    base_model = PeftConfig.from_pretrained(out / "adapter").base_model_name_or_path
    assert base_model == str(Path(cfg.backbone).resolve())
    tokenizer = AutoTokenizer.from_pretrained(base_model, model_max_length=cfg.max_seq_len)
    for client in range(cfg.num_clients):
        model = load_with_peft(base_model, cfg.num_labels, out / "adapter", out / "clients" / str(client) / "adapter")
        torch.testing.assert_close(probabilities(model, tokenizer), expected(out, client, True), atol=ATOL, rtol=0)
    model = load_with_peft(base_model, cfg.num_labels, out / "adapter", None)
    torch.testing.assert_close(probabilities(model, tokenizer), expected(out, 0, False), atol=ATOL, rtol=0)


def test_a_private_head_is_refused_as_peft_adapters_and_nothing_is_written(head_run, tmp_path):
    with pytest.raises(ExportError, match=r"private_head='classifier'.*use --format merged"):
        RunModel(head_run, 0).export(tmp_path / "refused", format="peft")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ExportError, match="'onnx' is not one of merged, peft"):
        RunModel(head_run, 0).export(tmp_path / "onnx", format="onnx")
    assert not (tmp_path / "onnx").exists()
    written = save_adapters(head_run)  # the global adapter only: no client's private track is a peft adapter
    assert not any("clients" in f.parts for f in written) and (head_run / "adapter" / "adapter_config.json") in written
    assert not list((head_run / "clients").rglob("adapter*"))


def test_a_backbone_its_name_cannot_rebuild_is_saved_beside_the_adapters(head_run, tmp_path):
    """``tiny`` has no files (seeded random weights): the export carries the backbone in ``base/``; its global
    track has no private head, so it is a peft adapter."""
    cfg = fedslip.load_config(head_run / "config.toml")
    want = expected(head_run, 0, False)
    export = RunModel(head_run, 0, use_private=False).export(tmp_path / "global", format="peft")
    meta = json.loads((export / EXPORT_META).read_text())
    assert meta["base_model"] == str((export / "base").resolve())
    model = load_with_peft(meta["base_model"], cfg.num_labels, export / "global", None)
    torch.testing.assert_close(probabilities(model, AutoTokenizer.from_pretrained(export)), want, atol=ATOL, rtol=0)


def test_same_backbone_sees_weights_a_checkpoint_lacks(tiny_dir, tmp_path):
    """A checkpoint without the pooler loads it at random: its name alone does not rebuild the backbone."""
    def load(path):
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)

    partial = tmp_path / "no-pooler"
    partial.mkdir()
    state = load_file(tiny_dir / "model.safetensors")
    save_file({n: t for n, t in state.items() if ".pooler." not in n}, partial / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(tiny_dir / "config.json", partial / "config.json")
    assert same_backbone(load(tiny_dir), load(tiny_dir), ["classifier"])
    assert not same_backbone(load(partial), load(tiny_dir), ["classifier"])


def test_export_cli_writes_peft_adapters_and_refuses_bad_input(run, head_run, tmp_path, capsys):
    out, *_ = run

    def flags(run_dir: Path, target: Path, fmt: str) -> list[str]:
        return ["export", "--run", str(run_dir), "--client", "1", "--out", str(target), "--format", fmt]

    assert build_parser().parse_args(flags(out, tmp_path, "merged")[:-2]).format == "merged"  # the default
    assert all(build_parser().parse_args(flags(out, tmp_path, f)).format == f for f in EXPORT_FORMATS)
    good = run_cli(*flags(out, tmp_path / "peft", "peft"))
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == str(tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} >= {"global", "private", EXPORT_META, "README.md",
                                                              "tokenizer_config.json"}
    with pytest.raises(SystemExit) as bad:
        main(flags(out, tmp_path / "onnx", "onnx"))
    assert bad.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    assert main(flags(head_run, tmp_path / "head", "peft")) == 2
    assert capsys.readouterr().err.startswith("fedslip: error: --format peft cannot express")
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "head").exists()


@pytest.mark.parametrize("method", ["ditto", "feddpa_fixed", "fedper", "fedsa_lora"])
def test_the_new_presets_export_what_predict_computes(tmp_path, data_dir, tiny_dir, method):
    """A personal model alone (ditto), a weighted mix of the tracks (feddpa_fixed) and a global adapter with
    the client's local parts (fedper, fedsa_lora): the merged export gives predict's probabilities, and
    the peft export (where peft can express the model) runs as its README says."""
    out = make_run(tmp_path / method, data_dir, str(tiny_dir), method=method, rounds=2, lr=0.02, private_lr=0.02)
    want = expected(out, 1, True)
    assert (want - expected(out, 1, False)).abs().max() > 100 * ATOL  # the client's own parts matter
    merged = RunModel(out, 1).export(tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    torch.testing.assert_close(probabilities(model, AutoTokenizer.from_pretrained(merged)), want, atol=ATOL, rtol=0)
    if method == "feddpa_fixed":
        with pytest.raises(ExportError, match="private_weight"):
            RunModel(out, 1).export(tmp_path / "peft", format="peft")
        assert not (tmp_path / "peft").exists() or not any((tmp_path / "peft").iterdir())
        return
    export = RunModel(out, 1).export(tmp_path / "peft", format="peft")
    snippet = re.search(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(snippet, namespace)
    torch.testing.assert_close(probabilities(namespace["model"], namespace["tokenizer"]), want, atol=ATOL, rtol=0)


def card_row(text: str, label: str) -> str:
    """The value cell of the model card's table row ``label``."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert rows, f"the model card has no row {label!r}"
    return rows[0].split(" | ")[1].rstrip(" |")


def test_an_export_has_a_model_card_naming_its_method_data_and_the_runs_metrics(run, tmp_path):
    """README.md at the top of the export, as transformers' and peft's cards: Hub metadata, then the base model,
    the method with its preset's values, the data and partition, the metrics of the run's summary.json, the
    bytes per round, whose private track it holds and the commands that made the run and the export."""
    import statistics

    from huggingface_hub import ModelCard

    out, cfg, _ = run
    summary = json.loads((out / "summary.json").read_text())
    export = RunModel(out, 1).export(tmp_path / "peft", format="peft")
    card = ModelCard.load(export / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-classification"
    assert {"fedslip", "federated-learning", "lora", "transformers"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local backbone directory is no hub id; the text names it
    assert not list(export.glob("*/README.md"))  # peft's own card is folded in, not left beside an adapter
    text = card.text

    def pct(value):  # as the card writes an accuracy
        return f"{100 * value:.1f}%"

    per_client = summary["personalized_accuracy_per_client"]
    assert card_row(text, "global accuracy (global track, global test set)") == pct(summary["global_accuracy"])
    assert card_row(text, "personalized accuracy, zero-shot (each client's model on its own test rows, mean over "
                          "clients)") == pct(summary["personalized_accuracy"])
    assert card_row(text, "personalized accuracy per client, min / median / max over 2 clients") == " / ".join(
        pct(v) for v in (min(per_client), statistics.median(per_client), max(per_client)))
    assert card_row(text, "client 1's personalized accuracy (this model)") == pct(per_client[1])
    assert card_row(text, "MiB per round (upload + download, all clients)") == f"{summary['comm_mib_per_round']:.3f}"
    assert summary["kstep_accuracy"] is None and "after K-step" not in text  # this run ran no K-step
    assert "# FedSLIP `fedslip`: client 1's personalized model" in text
    assert "Included: client 1's private track." in text
    assert card_row(text, "objective") == "`separated`" and card_row(text, "fedprox_mu") == "`0.01`"
    assert card_row(text, "private_warmup_rounds") == "`0` (the preset: `1`)"  # the run's own value
    assert card_row(text, "partition") == "`dominant` (dominant fraction 0.8)" and card_row(text, "clients") == "2"
    assert card_row(text, "rows per client (train / validation / test)") == "32 / 0 / 16"
    assert card_row(text, "accuracies measured on") == "the `test` split"
    assert f"`{Path(cfg.backbone).resolve()}`" in text  # the base model
    assert f"fedslip run --config {out}/config.toml" in text
    assert f"fedslip export --run {out} --client 1 --out {export} --format peft" in text
    # a run with K-step and clients far apart, exported merged and global: the K-step row, no private track
    again = tmp_path / "with-kstep"
    shutil.copytree(out, again)
    (again / "summary.json").write_text(json.dumps({**summary, "kstep_accuracy": 0.8766, "kstep_lr": 0.001,
                                                    "personalized_accuracy_per_client": [0.93, 0.61]}))
    (tmp_path / "results.json").write_text(json.dumps({"command": "fedslip compare --methods fedslip ...",
                                                       "runs": [{"dir": str(again)}]}))  # a comparison's run
    merged = RunModel(again, 0, use_private=False).export(tmp_path / "merged")
    card = ModelCard.load(merged / "README.md")
    assert card.data.library_name == "transformers"
    assert card_row(card.text, "personalized accuracy per client, min / median / max over 2 clients") == \
        "61.0% / 77.0% / 93.0%"
    assert card_row(card.text, f"after K-step ({cfg.kstep} local steps per client at lr 0.001; the fine-tuned models "
                               "are not in this export)") == "87.7%"
    assert "# FedSLIP `fedslip`: the global model" in card.text and "Included: the global track only" in card.text
    assert f"--client 0 --out {merged} --global --format merged" in card.text
    assert f"the run: `{again}`, made by `fedslip compare --methods fedslip ...`" in card.text


def test_predict_prints_one_line_per_text_and_reads_texts_from_a_file_or_stdin(head_run, tmp_path, capsys,
                                                                               monkeypatch):
    """A text holding a newline or a tab printed as two lines or an extra column; each is escaped as in Python
    (``\\n``, ``\\t``). ``--file`` reads one text per line, a .jsonl file's "text" fields (which may hold
    newlines), or standard input (``-``); each gives what ``RunModel.predict`` gives for the same texts."""
    import io

    from fedslip.inference import read_texts

    texts = ["stocks profit\nmarket news", "team\tcoach \\ match", "war minister election today"]
    expected = RunModel(head_run, 0).predict(texts)
    assert main(["predict", "--run", str(head_run), "--client", "0", *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t") for line in lines] == [[p.class_name, f"{max(p.probabilities):.3f}", text] for p, text in
                                                     zip(expected, ["stocks profit\\nmarket news",
                                                                    "team\\tcoach \\\\ match", texts[2]])]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "lines.txt").write_text("team coach match\r\n\nstocks profit market news\n")
    assert read_texts(tmp_path / "texts.jsonl") == texts
    assert read_texts(tmp_path / "lines.txt") == ["team coach match", "stocks profit market news"]  # blank skipped
    for source, given in ((str(tmp_path / "texts.jsonl"), texts), ("-", ["team coach match", "software chip"])):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(given).encode())))
        assert main(["predict", "--run", str(head_run), "--client", "0", "--json", "--file", source]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert printed == [p.__dict__ for p in RunModel(head_run, 0).predict(given)]
