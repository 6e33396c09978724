"""Experiment configuration: one dataclass, its defaults, method presets, validation, TOML load/dump.

Every field documents itself in ``metadata["help"]``; the CLI flags (``--num-clients`` for
``num_clients``) and the config reference (docs/configuration.md) are generated from these fields, so the three
cannot drift apart.

Resolution order (later wins): dataclass defaults -> the method's preset (``PRESETS``) -> TOML file
-> command-line flags. A preset only fills fields the user did not set.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

METHODS = ("fedavg_lora", "dual_naive", "fedslip", "centralized", "fedper", "fedrep", "fedbabu", "fedsa_lora",
           "ditto", "feddpa_fixed", "feddpa", "local")
PARTITIONS = ("dominant", "dirichlet", "iid", "natural", "own")
HEADS = ("shared", "shared_full")
PRIVATE_HEADS = ("none", "bias", "classifier")
PRIVATE_PHASES = ("interleaved", "first")
OBJECTIVES = ("global_only", "joint", "separated", "ditto")
PRECISIONS = ("auto", "bf16", "fp32")
PRUNE_SCOPES = ("matrix", "global")
LOCAL_PARTS = ("head", "lora_A", "lora_B")
LOCAL_PHASES = ("joint", "first", "frozen")
EVAL_SPLITS = ("test", "val")
KSTEP_PARAMS = ("inference", "head")
ENGINES = ("embedded", "flower-sim")
AGGREGATIONS = ("fedavg", "median", "trimmed_mean")
DP_MODES = ("central", "local")
CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "topk", "topk+fp16", "topk+bf16", "topk+int8", "topk+int4")
GRANULARITIES = ("tensor", "row")
TRACKERS = ("csv", "tensorboard", "mlflow", "wandb")
# the allowed values of every string field with a fixed set of them (validation and the CLI's choices)
CHOICES = {"method": METHODS, "engine": ENGINES, "partition": PARTITIONS, "head": HEADS, "objective": OBJECTIVES,
           "precision": PRECISIONS, "private_prune_scope": PRUNE_SCOPES, "eval_split": EVAL_SPLITS,
           "local_phase": LOCAL_PHASES, "kstep_params": KSTEP_PARAMS, "aggregation": AGGREGATIONS, "dp_mode": DP_MODES,
           "private_head": PRIVATE_HEADS,
           "private_phase": PRIVATE_PHASES, "upload_codec": CODECS, "download_codec": CODECS,
           "quant_granularity": GRANULARITIES}
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


FROM_PRESET = None  # default of the fields a method preset sets: resolved in ExperimentConfig.__post_init__


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ExperimentConfig:
    # --- experiment ---------------------------------------------------------------------------
    method: str = _f("fedslip", f"Method preset: {', '.join(METHODS)}. Presets set the method fields "
                     "below unless you set them yourself.")
    engine: str = _f("embedded", "Where `fedslip run` federates: `embedded` (in-process, one backbone) or "
                     "`flower-sim` (Flower's Ray simulation runtime, one ClientApp per client). Deployments "
                     "run the same app through `flwr run` (docs/flower.md).")
    rounds: int = _f(5, "Federated rounds.")
    num_clients: int = _f(4, "Number of clients.")
    fraction_fit: float = _f(1.0, "Fraction of clients sampled to train each round (at least one).")
    eval_fraction: float = _f(1.0, "Fraction of clients whose own models are evaluated after each round (a seeded "
                              "draw, at least one; the per-round personalized accuracy is their mean). The last "
                              "round evaluates every client on its own rows, and such a sample of them also on "
                              "the global test set, so a 1,000-client run does not evaluate 1,000 clients "
                              "every round.")
    seed: int = _f(0, "Seed for partitions, initialization, client sampling and batch order.")
    report_to: list[str] = _f([], f"Experiment trackers fed with every round's metrics: any of {', '.join(TRACKERS)} "
                              "(docs/usage.md, Experiment tracking; tensorboard/mlflow/wandb are optional extras).")
    audit: bool = _f(False, "Record every accepted client's change of the global track, as the server received "
                     "it, in audit/round-<r>.safetensors, for `fedslip audit` (what an honest-but-curious "
                     "server can infer; docs/privacy.md). Not with partition = 'own': the audit scores its guesses "
                     "against drawn class proportions, which the clients' own files do not have.")
    strict_health: bool = _f(False, "Stop the run (after the round's checkpoint; CLI exit code 3) when a round shows a "
                             "health symptom: global accuracy at chance, personalized at the clients' majority floor, "
                             "a NaN or rising loss, a client far behind (docs/usage.md, Run health).")
    # --- data -------------------------------------------------------------------------------
    data_dir: str = _f("", "Directory with train/test CSV(.gz) files. Empty: env FEDSLIP_DATA_DIR, else the "
                       "hub dataset `fancyzhx/ag_news`.")
    text_columns: list[str] = _f(["title", "description"], "CSV columns joined (with a space) into the input "
                                 "text.")
    label_column: str = _f("label", "CSV column holding the integer class label (0-based).")
    class_names: list[str] = _f(AG_NEWS_CLASSES, "Class names, index = label. Their count is the number of "
                                "classes.")
    partition: str = _f("dominant", f"How rows become clients: {', '.join(PARTITIONS)}. `dominant`, `dirichlet`, "
                        "`iid`: drawn label distributions. `natural`: one client per value of the column "
                        "`partition_by` (e.g. FDU-MTL's review domains), its train/validation rows from its group of "
                        "the train split, its test rows its group of the test split. `own`: each client's "
                        "rows are its own CSV file (`client_data`, or a SuperNode's `data-path` node config), split "
                        "by the client; the server reads only the global test set (data_dir's test split).")
    partition_by: str = _f("", "partition=natural: the CSV column whose values name the clients (flwr-datasets' "
                           "NaturalIdPartitioner convention): client i = the i-th value in sorted order (or of "
                           "natural_groups); num_clients must equal the number of groups.")
    natural_groups: list[str] = _f([], "partition=natural: the groups (values of partition_by) that become clients, "
                                   "in this order; empty = every value of the train split, sorted.")
    dominant_fraction: float = _f(0.8, "partition=dominant: share of client i's data from class i mod C; the "
                                  "rest is spread evenly over the other classes.")
    dirichlet_alpha: float = _f(0.5, "partition=dirichlet: concentration of each client's class proportions.")
    samples_per_client: int = _f(500, "Training rows per client (from the train split, disjoint between "
                                 "clients); partition=natural: at most this many of its group's rows.")
    test_samples_per_client: int = _f(250, "Test rows per client, drawn from the test split with the client's "
                                      "train label distribution, disjoint between clients; partition=natural: at "
                                      "most this many of its group's test rows (the group's test set).")
    val_samples_per_client: int = _f(0, "Validation rows per client carved from the train split (disjoint from "
                                     "all train rows), same label distribution (partition=natural: the first rows of "
                                     "its shuffled group). Needed for eval_split=val.")
    client_data: list[str] = _f([], "partition=own: one CSV/CSV.gz per client (the data directory's columns), "
                                "client i's file i; empty in a deployment whose SuperNodes each name their own "
                                "file (node config `data-path`). The client shuffles its file (seed) and takes "
                                "test_samples_per_client test rows, val_samples_per_client validation rows and up "
                                "to samples_per_client training rows.")
    global_test_samples: int = _f(2000, "Size of the stratified global test set drawn from the test split; "
                                  "0 = the whole test split.")
    eval_split: str = _f("test", "What accuracies are measured on: `test` (the report) or `val` (tuning: each "
                         "client's validation rows, global = their union; with partition=own the server's own "
                         "`val.csv[.gz]` in data_dir, none without one). Never tune on test.")
    max_seq_len: int = _f(64, "Token limit per text (longer texts are truncated).")
    # --- model ------------------------------------------------------------------------------
    backbone: str = _f("minilm", "`minilm` (packaged all-MiniLM-L6-v2, offline), `tiny` (random-init 2-layer "
                       "BERT for tests), a local model directory, or a hub id such as "
                       "`distilbert-base-uncased`.")
    lora_rank: int = _f(8, "Rank of the global-track LoRA.")
    lora_alpha: float = _f(16.0, "LoRA alpha of the global track (scaling = alpha / rank).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input of both tracks.")
    lora_targets: list[str] = _f([], "Module names LoRA adapts; empty = per architecture (BERT/RoBERTa "
                                 "query,value; DistilBERT q_lin,v_lin).")
    head: str = _f(FROM_PRESET, "Classifier head in the global track: `shared` = the final classifier layer; "
                   "`shared_full` = the whole head (adds DistilBERT's pre_classifier).")
    # --- local training ---------------------------------------------------------------------
    local_epochs: int = _f(1, "Local epochs per round (ignored when local_steps > 0).")
    local_steps: int = _f(0, "Local optimizer steps per round; 0 = use local_epochs.")
    batch_size: int = _f(32, "Training batch size.")
    eval_batch_size: int = _f(128, "Evaluation batch size.")
    group_by_length: bool = _f(False, "Training batches of rows with similar length (sorted within shuffled "
                               "chunks of 16 batches): less padding, different batch composition "
                               "(docs/performance.md).")
    lr: float = _f(8e-3, "AdamW learning rate of the global track.")
    weight_decay: float = _f(0.0, "AdamW weight decay (both tracks).")
    precision: str = _f("auto", "`bf16` autocast for forward passes (weights and optimizer stay fp32), "
                        "`fp32`, or `auto` (bf16 where the CPU/GPU supports it).")
    parallel_clients: int = _f(1, "Embedded engine: clients trained side by side in this many worker processes "
                               "(each with its own backbone and cores // N threads); 1 = sequential.")
    client_cpus: int = _f(1, "engine=flower-sim: CPU cores Ray reserves for each ClientApp (clients run "
                            "side by side while cores last).")
    reply_timeout: float = _f(0.0, "Flower engines: seconds the server waits for the replies to one batch of "
                              "messages; clients that have not answered count as failed. 0 = wait forever.")
    rejoin_timeout: float = _f(120.0, "Flower engines: seconds the server waits for a client whose node is not "
                               "connected (not started yet, or restarting) before counting it as failed for "
                               "that message.")
    kstep: int = _f(25, "After the last round each client fine-tunes its final model for this many local "
                    "steps and is evaluated again (the baseline's K-step personalization); 0 = skip.")
    kstep_lr: float = _f(1e-3, "Learning rate of K-step, for every tensor it trains; 0 = `lr`. Tune it (with "
                         "`kstep`) on validation rows: `fedslip kstep --run DIR --steps N --lr X` re-runs K-step "
                         "on a finished run.")
    kstep_params: str = _f("inference", "What K-step trains, on the loss of the method's inference model: "
                           "`inference` = every tensor that model uses (fedslip: global + private tracks together, "
                           "mask kept; ditto: the personal model), `head` = its classifier head only (FedBABU's "
                           "head-only fine-tune).")
    # --- server: aggregation and update validation -----------------------------------------
    aggregation: str = _f("fedavg", "Server aggregation of the global track: `fedavg` (sample-weighted mean), "
                          "`median` or `trimmed_mean` (coordinate-wise, robust to outlier clients), with "
                          "Flower's FedAvg / FedMedian / FedTrimmedAvg strategies.")
    trim_fraction: float = _f(0.2, "aggregation=trimmed_mean: share cut from each end per coordinate.")
    min_fit_clients: int = _f(1, "Fewest valid client updates that still apply a round; fewer stops the run "
                              "(after the last completed round's checkpoint).")
    dp_clip: float = _f(0.0, "Differential privacy on the global track: clip each client's change of it to this L2 "
                        "norm C (0 = no DP); the server averages the clipped changes uniformly (fedslip/privacy.py).")
    dp_noise_multiplier: float = _f(0.0, "DP: the noise multiplier sigma: Gaussian noise of std sigma * C / (clients "
                                    "per round) on every coordinate of the mean (dp_mode central) or sigma * C on "
                                    "each client's change (local); epsilon from dp-accounting's RDP accountant.")
    dp_mode: str = _f("central", "DP: `central` = the server clips each change and noises the mean (protects "
                      "clients from whoever sees the released global track, not from the server); `local` = each "
                      "client clips its change and adds N(0, (sigma * C)^2) before upload (protects it from the "
                      "server too; far more noise in the mean).")
    dp_delta: float = _f(1e-5, "DP: the delta at which epsilon is reported.")
    max_update_norm: float = _f(0.0, "Reject a client update whose L2 distance from the broadcast global track "
                                "exceeds this; 0 = no bound.")
    max_payload_bytes: int = _f(0, "Reject a client payload larger than this many bytes; 0 = 2x the global "
                                "track's fp32 payload.")
    # --- wire: compression (fedslip/codecs.py) -------------------------------------------------
    upload_codec: str = _f("fp32", "What a client sends: `fp32` = its global track's weights; any other codec "
                           "sends its update (weights - what it received, + its error-feedback residual): "
                           "`fp16`, `bf16`, `int8`/`int4` (affine, scales alongside), `topk` (the "
                           "topk_fraction largest of each tensor) or `topk+<fp16|bf16|int8|int4>`.")
    download_codec: str = _f("fp32", "What the server broadcasts: `fp32` = the global track's weights; any other "
                             "codec (as upload_codec) sends the change from what the clients already hold; what "
                             "it leaves out is sent in later rounds.")
    topk_fraction: float = _f(0.1, "topk codecs: share of each tensor's coordinates sent (largest magnitudes).")
    quant_granularity: str = _f("tensor", "int8/int4 codecs: one affine scale per `tensor` or per `row` of each "
                                "matrix (more scales, smaller error).")
    error_feedback: bool = _f(True, "Lossy upload codecs: each client adds what compression left out of its last "
                              "update to the next one (a residual kept in its state directory, never sent).")
    # --- method (set by presets) ----------------------------------------------------------
    private_track: bool = _f(FROM_PRESET, "Give every client a private LoRA track that never leaves it.")
    local_params: list[str] = _f(FROM_PRESET, "Parts of the global adapter each client keeps and never sends "
                                 "(personalization by partial sharing): any of `head` (the classifier modules "
                                 "the global adapter trains), `lora_A`, `lora_B`. Kept in the client's state "
                                 "directory; the server's model holds their initial values.")
    local_phase: str = _f(FROM_PRESET, "How the local_params train: `joint` (with the shared parts, every batch: "
                          "FedPer, FedSA-LoRA), `first` (each round a phase of local_first_steps batches with "
                          "the shared parts frozen, then the shared parts with the local ones frozen: FedRep), "
                          "`frozen` (never during federation; K-step fine-tunes them alone: FedBABU).")
    local_first_steps: int = _f(0, "local_phase=first: batches of each round's local phase; 0 = as many as the "
                                "shared phase.")
    objective: str = _f(FROM_PRESET, "`global_only` (FedAvg), `joint` (one loss on the combined logits "
                        "trains both tracks), `separated` (global loss on global-only logits; private loss on "
                        "combined logits), `ditto` (the private track is a whole personal model, the global "
                        "track's shape, trained alone toward the global track received: ditto_lambda).")
    private_weight: float = _f(FROM_PRESET, "How the two LoRA tracks combine when both run: 0 = they add (g + p: "
                               "FedSLIP); a in (0, 1) = (1 - a) * g + a * p (FedDPA's fixed weighting). The "
                               "classifier is not weighted; the global track alone always runs at full weight.")
    instance_weight: float = _f(FROM_PRESET, "FedDPA's instance-wise weight at inference (feddpa): 0 = off "
                                "(private_weight fixes the mix); w in (0, 1] = each input x runs through "
                                "alpha(x) * g + (1 - alpha(x)) * p with alpha(x) = w * mean_j cos(e(x), e(x_j)), "
                                "e = the mean last hidden state of the model with the private track alone, x_j "
                                "the client's instance_reference_rows reference rows. Training keeps "
                                "private_weight's fixed mix.")
    instance_reference_rows: int = _f(5, "instance_weight: how many of the client's training rows (a seeded draw per "
                                      "client, at most all of them) each input is compared with.")
    ditto_lambda: float = _f(0.1, "objective=ditto: weight lambda of the personal model's proximal term "
                             "(lambda/2)*||p - g_round||^2 toward the global track received this round; 0 = "
                             "purely local training of the personal model.")
    detach: bool = _f(FROM_PRESET, "objective=separated: the private loss treats the global track as constant, so "
                      "it sends no gradient to it.")
    fedprox_mu: float = _f(FROM_PRESET, "FedProx: adds (mu/2)*||w - w_round||^2 over the global track to its loss.")
    private_rank: int = _f(8, "Rank of the private LoRA track.")
    private_alpha: float = _f(16.0, "LoRA alpha of the private track.")
    private_lr: float = _f(4e-3, "AdamW learning rate of the private track.")
    private_targets: list[str] = _f([], "Modules of the private track; empty = same as the global track.")
    private_head: str = _f("none", "A private head in the private track, added to the shared classifier's "
                           "logits whenever the private track runs: `none`; `bias` (a per-client logit offset, "
                           "C numbers); `classifier` (a per-client linear correction W_p h + b_p of the shared "
                           "classifier). Zero at start; never pruned; never sent.")
    private_phase: str = _f(FROM_PRESET, "objective=separated: `interleaved` = the private loss on the same "
                            "batches as the global loss, against the locally trained global track; `first` = "
                            "each round starts with a private phase against the global track as received this "
                            "round (sg[g_round]), then the global phase; at inference the private track is "
                            "combined with the next aggregate, not with g_round.")
    private_every: int = _f(1, "Take the private loss on every k-th local batch only (1 = every batch): less "
                            "compute per round for the separated objective.")
    private_local_steps: int = _f(0, "private_phase=first: batches in each round's private phase; 0 = "
                                  "ceil(local steps / private_every). More private steps per round than "
                                  "global ones give the private track more training at more compute.")
    private_warmup_rounds: int = _f(FROM_PRESET, "Rounds (from round 1) in which the private track is frozen and only "
                                    "the global track trains.")
    private_freeze_round: int = _f(FROM_PRESET, "After this round the private track stops training; 0 = never.")
    private_target_sparsity: float = _f(FROM_PRESET, "Magnitude-pruning mask: final share of private weights pruned "
                                        "(0 = no mask).")
    private_prune_rate: float = _f(FROM_PRESET, "Share of the still-unmasked private weights pruned at the end of "
                                   "each pruning round.")
    private_prune_scope: str = _f("matrix", "Prune the smallest magnitudes per weight `matrix` or over the "
                                  "`global` private track.")
    private_prune_start_round: int = _f(1, "First round at whose end pruning happens (after warmup).")
    private_rewind_round: int = _f(FROM_PRESET, "Rewind surviving private weights to their values at the end of this "
                                   "round after each pruning (0 = initialization); -1 = no rewinding.")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        """Fields left at ``FROM_PRESET`` take the method preset's value (else the base value), so that every
        way of building a config (``ExperimentConfig(method=...)``, ``make_config``, TOML, CLI, Flower
        run config) gives the same one; explicitly given values always win."""
        preset = PRESETS.get(self.method, {})  # an unknown method is named by validate()
        for name, base in PRESET_BASE.items():
            if getattr(self, name) is FROM_PRESET:
                setattr(self, name, preset.get(name, base))
        self.validate()

    @property
    def clients_per_round(self) -> int:
        """Clients sampled each round: max(1, round(fraction_fit * num_clients))."""
        return self.clients_for(self.fraction_fit)

    def clients_for(self, fraction: float) -> int:
        """How many clients a sampling fraction takes: max(1, round(fraction * num_clients))."""
        return max(1, round(fraction * self.num_clients))

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def resolved_data_dir(self) -> str:
        """The data directory as an absolute path (``data_dir``, else FEDSLIP_DATA_DIR; "" = the hub), so
        a run's config.toml still names it when read from another working directory."""
        path = self.data_dir or os.environ.get("FEDSLIP_DATA_DIR", "")
        return str(Path(path).resolve()) if path else ""

    def resolved_client_data(self) -> list[str]:
        """``client_data`` as absolute paths (saved so in a run's config.toml, like the data directory)."""
        return [str(Path(p).resolve()) for p in self.client_data]

    def validate(self) -> None:
        """Check every field once, here, so that the rest of the code can trust the config."""
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")

        def positive(*names: str) -> None:
            for n in names:
                if not getattr(self, n) > 0:
                    raise ConfigError(f"{n} must be > 0, got {getattr(self, n)!r}")

        def non_negative(*names: str) -> None:
            for n in names:
                if getattr(self, n) < 0:
                    raise ConfigError(f"{n} must be >= 0, got {getattr(self, n)!r}")

        for name in FLOAT_FIELDS:  # NaN passes every comparison below; inf breaks training later
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)!r}")
        for name, allowed in CHOICES.items():
            choice(name, allowed)
        positive("rounds", "num_clients", "samples_per_client", "test_samples_per_client", "batch_size",
                 "eval_batch_size", "lr", "max_seq_len", "lora_rank", "lora_alpha", "private_rank",
                 "private_alpha", "private_lr", "dirichlet_alpha")
        non_negative("local_steps", "local_epochs", "kstep", "weight_decay", "fedprox_mu",
                     "val_samples_per_client", "global_test_samples", "private_warmup_rounds",
                     "private_freeze_round", "lora_dropout", "private_prune_start_round", "private_local_steps",
                     "max_update_norm", "max_payload_bytes", "reply_timeout", "rejoin_timeout", "kstep_lr",
                     "local_first_steps", "ditto_lambda", "dp_clip", "dp_noise_multiplier")
        positive("min_fit_clients", "parallel_clients", "client_cpus", "private_every", "instance_reference_rows")
        if self.min_fit_clients > self.num_clients:
            raise ConfigError(f"min_fit_clients={self.min_fit_clients} exceeds num_clients={self.num_clients}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ConfigError("set local_epochs > 0 or local_steps > 0 (both are 0: clients would not train)")
        if not 0 < self.dominant_fraction <= 1:
            raise ConfigError(f"dominant_fraction must be in (0, 1], got {self.dominant_fraction!r}")
        if not 0 < self.topk_fraction <= 1:
            raise ConfigError(f"topk_fraction must be in (0, 1], got {self.topk_fraction!r}")
        if self.method == "centralized" and (self.upload_codec, self.download_codec) != ("fp32", "fp32"):
            raise ConfigError("method='centralized' sends nothing: upload_codec and download_codec must be 'fp32'")
        for name in ("fraction_fit", "eval_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.private_target_sparsity < 1:
            raise ConfigError(f"private_target_sparsity must be in [0, 1), got {self.private_target_sparsity!r}")
        if not 0 < self.private_prune_rate < 1:
            raise ConfigError(f"private_prune_rate must be in (0, 1), got {self.private_prune_rate!r}")
        if self.private_rewind_round < -1:
            raise ConfigError(f"private_rewind_round must be -1 (off) or >= 0, got {self.private_rewind_round}")
        if self.lora_dropout >= 1:
            raise ConfigError(f"lora_dropout must be < 1, got {self.lora_dropout!r}")
        if len(self.class_names) < 2:
            raise ConfigError(f"class_names needs at least 2 classes, got {self.class_names!r}")
        unknown_trackers = [t for t in self.report_to if t not in TRACKERS]
        if unknown_trackers:
            raise ConfigError(f"report_to: {', '.join(map(repr, unknown_trackers))} not among {', '.join(TRACKERS)}")
        if not self.text_columns:
            raise ConfigError("text_columns must name at least one column")
        if self.client_data and self.partition != "own":
            raise ConfigError(f"client_data names the clients' own files: it needs partition='own', not "
                              f"{self.partition!r}")
        if self.audit and self.partition == "own":
            raise ConfigError("audit = true records the updates for fedslip audit, which scores its guesses against "
                              "each client's drawn class proportions; with partition='own' the clients bring their own "
                              "data and there are none to score against: drop --audit")
        if self.client_data and len(self.client_data) != self.num_clients:
            raise ConfigError(f"client_data names {len(self.client_data)} files for num_clients={self.num_clients}: "
                              "one file per client")
        if self.eval_split == "val" and self.val_samples_per_client == 0:
            raise ConfigError("eval_split='val' needs val_samples_per_client > 0")
        if not self.private_track and self.objective != "global_only":
            raise ConfigError(f"objective={self.objective!r} needs private_track=true")
        if self.private_track and self.objective == "global_only":
            raise ConfigError("private_track=true needs objective 'joint', 'separated' or 'ditto'")
        if not 0 <= self.instance_weight <= 1:
            raise ConfigError(f"instance_weight must be in [0, 1], got {self.instance_weight!r}")
        if self.instance_weight and not self.private_weight:
            raise ConfigError("instance_weight (FedDPA's instance-wise weight) needs private_weight > 0: the private "
                              "track trains on the fixed mix (1 - a) * sg[g] + a * p")
        if self.partition == "natural" and not self.partition_by:
            raise ConfigError("partition='natural' needs partition_by: the CSV column whose values name the clients")
        if self.partition != "natural" and (self.partition_by or self.natural_groups):
            raise ConfigError(f"partition_by / natural_groups name the groups of partition='natural', not "
                              f"{self.partition!r}")
        if len(set(self.natural_groups)) != len(self.natural_groups):
            raise ConfigError(f"natural_groups lists a group twice: {self.natural_groups!r}")
        if self.natural_groups and len(self.natural_groups) != self.num_clients:
            raise ConfigError(f"natural_groups names {len(self.natural_groups)} groups for num_clients="
                              f"{self.num_clients}: one client per group")
        if self.method == "local" and (set(self.local_params) != set(LOCAL_PARTS) or self.local_phase != "joint"
                                       or self.engine != "embedded"):
            raise ConfigError("method='local' (each client trains its whole adapter alone, nothing travels) keeps "
                              "local_params = every part and local_phase = 'joint', on engine='embedded'")
        if not 0 <= self.private_weight < 1:
            raise ConfigError(f"private_weight must be in [0, 1), got {self.private_weight!r}")
        if self.dp_noise_multiplier and not self.dp_clip:
            raise ConfigError("dp_noise_multiplier needs dp_clip > 0 (the noise is calibrated to the clipping norm)")
        if self.dp_clip and self.dp_mode == "central" and self.aggregation != "fedavg":
            raise ConfigError(f"dp_clip works with aggregation='fedavg' (a uniform mean of clipped changes), not "
                              f"{self.aggregation!r}")
        if self.dp_clip and self.method == "centralized":
            raise ConfigError("method='centralized' has no clients to protect: dp_clip must be 0")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta!r}")
        if self.private_weight and (not self.private_track or self.objective == "ditto"):
            raise ConfigError("private_weight weights the global and private tracks of an additive dual-track "
                              "method (objective 'joint' or 'separated')")
        if self.objective == "ditto" and self.private_head != "none":
            raise ConfigError("objective='ditto': the personal model has its own classifier; private_head must "
                              "be 'none'")
        if self.method == "centralized" and (self.engine != "embedded" or self.parallel_clients != 1
                                             or self.private_track):
            raise ConfigError("method='centralized' (one trainer on all clients' rows) runs on engine='embedded' "
                              "with parallel_clients=1 and no private track")
        if self.private_phase == "first" and self.objective != "separated":
            raise ConfigError("private_phase='first' needs objective='separated'")
        if self.private_local_steps and self.private_phase != "first":
            raise ConfigError("private_local_steps needs private_phase='first' (the interleaved schedule takes the "
                              "private loss on the global track's batches)")
        unknown_parts = [p for p in self.local_params if p not in LOCAL_PARTS]
        if unknown_parts:
            raise ConfigError(f"local_params: {', '.join(map(repr, unknown_parts))} not among {', '.join(LOCAL_PARTS)}")
        if set(self.local_params) >= {"lora_A", "lora_B", "head"} and self.method != "local":
            raise ConfigError("local_params keeps the whole global adapter local: nothing would be shared")
        if self.local_params and (self.private_track or self.method == "centralized"):
            raise ConfigError("local_params (partial sharing) works with one track: private_track=false, not "
                              "method='centralized'")
        if self.local_phase != "joint" and not self.local_params:
            raise ConfigError(f"local_phase={self.local_phase!r} needs local_params")
        if self.local_first_steps and self.local_phase != "first":
            raise ConfigError("local_first_steps needs local_phase='first'")
        if not self.private_track and self.private_head != "none":
            raise ConfigError(f"private_head={self.private_head!r} needs private_track=true")

    # --- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def experiment_dict(self) -> dict[str, Any]:
        """The keys that define the experiment's result (all but ``RUN_ONLY_KEYS``): what a resume must
        keep unchanged."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_KEYS}

    def experiment_diff(self, other: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
        """Experiment keys (``experiment_dict``) whose value differs from ``other``'s, as
        {key: (other's value, this config's value)}; ``ignore``d keys left out. The one comparison behind
        resume's, compare's and report's refusals to mix experiments.

        A key ``other`` lacks was added after it was written (a run of an older version): that run ran
        with the key's default (every new key's default keeps the old behaviour), so ``other`` is
        completed with the defaults its own values resolve to (preset-controlled keys included)."""
        mine = self.experiment_dict()
        missing = set(mine) - set(other)
        if missing:
            known = {k: v for k, v in other.items() if k in FIELDS}
            try:
                defaults = make_config(known).experiment_dict()
            except ConfigError:  # values the current version refuses: compare as written
                defaults = {}
            other = {**other, **{k: defaults[k] for k in missing if k in defaults}}
        return {k: (other.get(k), mine.get(k)) for k in sorted(set(mine) | set(other))
                if k not in ignore and mine.get(k) != other.get(k)}

    def with_run_only(self, changes: dict[str, Any]) -> ExperimentConfig:
        """This config with ``RUN_ONLY_KEYS`` changed (what a resume may change: how the run executes, never
        what it computes); any other key is refused."""
        check_run_only(changes)
        return make_config({**self.to_dict(), **changes})

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_toml())


# The value of each preset-controlled field when the method's preset does not set it (FedAvg's).
PRESET_BASE: dict[str, Any] = dict(
    private_track=False, objective="global_only", detach=True, fedprox_mu=0.0, head="shared",
    private_warmup_rounds=0, private_freeze_round=0, private_target_sparsity=0.0, private_prune_rate=0.2,
    private_rewind_round=-1, private_phase="interleaved", local_params=[], local_phase="joint", private_weight=0.0,
    instance_weight=0.0)
PRESET_KEYS = tuple(PRESET_BASE)

# Presets fill the method fields; anything the user sets explicitly wins.
PRESETS: dict[str, dict[str, Any]] = {
    # FedAvg + LoRA: one global track, no private state.
    "fedavg_lora": dict(private_track=False, objective="global_only", fedprox_mu=0.0, head="shared"),
    # The seed's first dual-track version: both tracks learn from one combined loss, no stabilizers,
    # and the whole classifier head travels with the global LoRA.
    "dual_naive": dict(private_track=True, objective="joint", detach=False, fedprox_mu=0.0,
                       head="shared_full", private_warmup_rounds=0, private_freeze_round=0,
                       private_target_sparsity=0.0, private_rewind_round=-1),
    # Reference, not a federated method: one trainer on the union of the clients' training rows, same
    # rows and steps per round as fedavg_lora; the upper bound for the global track.
    "centralized": dict(private_track=False, objective="global_only", fedprox_mu=0.0, head="shared"),
    # FedSLIP: clean separation, FedProx, warmup, sparse private track trained first in each round
    # against the global track as received. Values chosen on validation data (docs/results.md, "Choosing
    # FedSLIP's defaults"; docs/results/tuning.md).
    "fedslip": dict(private_track=True, objective="separated", detach=True, fedprox_mu=0.01,
                    head="shared", private_warmup_rounds=1, private_freeze_round=0,
                    private_target_sparsity=0.5, private_prune_rate=0.2, private_rewind_round=-1,
                    private_phase="first"),
    # Partial sharing: one global adapter, some of whose parts never leave the client.
    # FedPer (Arivazhagan et al., 2019, "Federated Learning with Personalization Layers"): shared LoRA
    # body, private classifier head, trained together.
    "fedper": dict(local_params=["head"], local_phase="joint"),
    # FedRep (Collins et al., ICML 2021, "Exploiting Shared Representations for Personalized Federated
    # Learning"): each round the private head first (body frozen), then the shared body (head frozen).
    "fedrep": dict(local_params=["head"], local_phase="first"),
    # FedBABU (Oh et al., ICLR 2022, "FedBABU: Toward Enhanced Representation for Federated Image
    # Classification"): the head stays at its (shared) initialization during federation; only the body
    # trains and travels; K-step fine-tunes the head.
    "fedbabu": dict(local_params=["head"], local_phase="frozen"),
    # FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
    # Learning"): LoRA A matrices shared and averaged, B matrices kept by each client.
    "fedsa_lora": dict(local_params=["lora_B"], local_phase="joint"),
    # Ditto (Li et al., ICML 2021, "Ditto: Fair and Robust Federated Learning Through Personalization"):
    # plain FedAvg on the global track; each client also trains a personal model of the same shape (its
    # own LoRA and classifier) toward the global track received, with weight ditto_lambda; inference
    # uses the personal model alone.
    "ditto": dict(private_track=True, objective="ditto", detach=True, fedprox_mu=0.0, head="shared",
                  private_warmup_rounds=0, private_freeze_round=0, private_target_sparsity=0.0,
                  private_rewind_round=-1, private_phase="interleaved"),
    # FedDPA (Yang et al., NeurIPS 2024, "Dual-Personalizing Adapter for Federated Foundation Models"), its
    # variant with a fixed weight (FedDPA-T with `local_weight`, the reference code's training and
    # set_glocal inference; the paper's instance-wise dynamic weight is not implemented): a global LoRA
    # trained alone and averaged; a local LoRA trained on (1 - a) * sg[g] + a * p; inference on the same mix.
    "feddpa_fixed": dict(private_track=True, objective="separated", detach=True, fedprox_mu=0.0, head="shared",
                         private_warmup_rounds=0, private_freeze_round=0, private_target_sparsity=0.0,
                         private_rewind_round=-1, private_phase="first", private_weight=0.5),
    # FedDPA with its instance-wise dynamic weight (the paper's method; FedDPA-T's training): trained as
    # feddpa_fixed; at inference each input x runs through alpha(x) * g + (1 - alpha(x)) * p, alpha(x) = w *
    # the mean cosine similarity of x's representation to the client's training rows' (instance_weight = w =
    # 0.5, the reference code's default; model.TrackedModel.instance_alpha).
    "feddpa": dict(private_track=True, objective="separated", detach=True, fedprox_mu=0.0, head="shared",
                   private_warmup_rounds=0, private_freeze_round=0, private_target_sparsity=0.0,
                   private_rewind_round=-1, private_phase="first", private_weight=0.5, instance_weight=0.5),
    # Local training, the lower bound of personalized FL (does federation help a client at all?): partial
    # sharing in which every part of the global adapter (LoRA A, B and the head) stays local, so each client
    # trains its own adapter on its own rows and nothing travels (engines.embedded.LocalEngine: 0 bytes).
    "local": dict(local_params=["head", "lora_A", "lora_B"], local_phase="joint"),
}

FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
# Where and how fast a run executes, not what it computes: these may change when a run is resumed.
RUN_ONLY_KEYS = frozenset({"engine", "data_dir", "eval_batch_size", "parallel_clients", "client_cpus",
                           "reply_timeout", "rejoin_timeout", "max_payload_bytes", "report_to",
                           "strict_health", "audit"})


def check_run_only(keys: Iterable[str]) -> None:
    """Refuse keys a resume cannot change: all but ``RUN_ONLY_KEYS``."""
    fixed = sorted(set(keys) - RUN_ONLY_KEYS)
    if fixed:
        raise ConfigError(f"--resume continues the run's experiment: {', '.join(fixed)} cannot change (only "
                          f"{', '.join(sorted(RUN_ONLY_KEYS))} can); start a new run with --out for other values")


FLOAT_FIELDS = tuple(n for n, f in FIELDS.items() if f.type in ("float", float))


def _coerce(name: str, value: Any) -> Any:
    """Convert a TOML/CLI value to the field's type, with an error that names the field."""
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
        if kind == "bool":
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise TypeError
                return low in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{name}: expected {kind}, got {value!r}")


def make_config(overrides: dict[str, Any] | None = None, toml_path: Path | None = None,
                **keys: Any) -> ExperimentConfig:
    """Build a validated config: defaults <- method preset <- TOML file <- ``overrides`` <- ``keys``.

    >>> make_config({"method": "fedslip", "rounds": 3}).fedprox_mu
    0.01
    >>> make_config(method="fedslip", rounds=3).rounds
    3
    """
    user: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; pass the path of a .toml file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            user.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    user.pop("tune", None)  # the [tune] table: the study settings of `fedslip tune` (fedslip.tune), not a config key
    user.update(overrides or {})
    user.update(keys)
    unknown = sorted(set(user) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    user = {k: _coerce(k, v) for k, v in user.items()}
    return ExperimentConfig(**user)  # the method preset is applied there


def load_config(path: Path) -> ExperimentConfig:
    """Load a fully resolved ``config.toml`` (as written into every run directory)."""
    return make_config(toml_path=path)
