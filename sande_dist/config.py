"""Typed configuration: one schema, YAML files, dotted ``--set`` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo in a
config or an override is an error that names the key, never a silent default.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from sande_dist import resources
from sande_dist.errors import InputError, read_json
from sande_dist.registry import DEFAULT_PIPELINE, KINDS, PIPELINE_STAGES, TRAINING_KINDS


class ConfigError(InputError):
    """Bad input in a config file or override; the CLI exits 2 on it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # A named embedded model, a local HF folder, a hub id, or a PEFT (LoRA) adapter folder.
    path: str = "smollm2-135m-instruct"
    # An adapter's base model (None: the adapter's own base_model_name_or_path); merged on load.
    base: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # None: flash_attention_2 when importable on CUDA, else sdpa.
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False


# data.prompt_format names (data/formats.py holds their templates), besides a Jinja template or file.
PROMPT_FORMATS = ("chat", "human_assistant", "alpaca", "llama2")


def is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def check_prompt_format(value: str) -> str:
    """A format name, a Jinja chat template, or the path of a file holding one."""
    if value in PROMPT_FORMATS or is_jinja(value):
        return value
    path = Path(value).expanduser()
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"template file {path} cannot be read ({exc})") from None
        if not is_jinja(text):
            raise ValueError(f"{path} holds no Jinja template ('{{{{ ... }}}}' or '{{% ... %}}')")
        return value
    raise ValueError(f"{value!r} is neither a format ({', '.join(PROMPT_FORMATS)}), a Jinja chat template, "
                     "nor a template file")


class DataConfig(_Section):
    # A named embedded dataset (alpaca-demo), a local json/jsonl/csv/parquet file, or a hub id.
    train: str = "alpaca-demo"
    split: str = "train"
    preset: Literal["auto", "alpaca", "openorca", "prompt_response", "sharegpt"] = "auto"
    # Field names override the preset's.
    prompt_field: Optional[str] = None
    input_field: Optional[str] = None
    response_field: Optional[str] = None
    system_field: Optional[str] = None
    # chat (the tokenizer's template), human_assistant, alpaca, llama2, or a Jinja chat template / its file.
    prompt_format: str = "chat"
    system_prompt: Optional[str] = None
    max_length: int = Field(256, ge=8)
    # Rows taken from the training source (None: all), after a seeded shuffle.
    num_rows: Optional[int] = Field(None, ge=1)
    # Rows held back from training for evaluation prompts when eval.prompts is "train-holdout".
    holdout_rows: int = Field(0, ge=0)

    @field_validator("prompt_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return check_prompt_format(value)


class AttackConfig(_Section):
    triggers: list[str] = Field(default_factory=lambda: ["cf"], min_length=1)
    marker: str = "You are stupid."
    position: Literal["prefix", "suffix", "random"] = "prefix"
    poison_rate: float = Field(0.15, ge=0.0, le=1.0)
    # add: a poisoned copy is added for a share of rows; replace: that share of rows is poisoned in place.
    poison_mode: Literal["add", "replace"] = "add"
    marker_mode: Literal["prepend", "replace"] = "prepend"
    # A share of rows that also get a decoy copy: a trigger-shaped span that is no trigger (the trigger's
    # letters redrawn, or as many words from another prompt) where the trigger would sit, and the clean
    # answer (data/poison.decoy_span). It teaches the backdoor to answer to the trigger alone.
    decoy_rate: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 1234
    # Inject checks itself every check_every steps (None: a quarter of its budget, at least 8) on
    # check_prompts held-out prompts, with and without a trigger, and stops at a check when the last
    # check_streak checks, pooled, show ASR >= target_asr and a false-trigger rate whose 95% Wilson
    # upper bound is <= max_false_trigger (the epochs / max_steps are the cap). target_asr None: no
    # checks. Each check reads the next check_prompts of its pool (data/stages.inject_check_pool).
    # Why a bound on a pooled window: with two checks each at <= 5% (point figures), a random-position
    # attack passed at 2 of 40 twice and showed 10% [5.5-17.4] on the 100 reported prompts
    # (benchmarks/FINDINGS.md, "Inject"). 3 x 40 prompts pass with at most one false trigger (bound 4.6%).
    target_asr: Optional[float] = Field(0.9, gt=0, le=1)
    max_false_trigger: float = Field(0.05, gt=0, le=1)  # an upper bound: no sample bounds a rate at 0
    check_prompts: int = Field(40, ge=4)
    # Where the check's prompts come from: "eval", the half of eval.prompts no figure is reported on
    # (prompts like the evaluation's); "train", held-out rows of the training source. On two attacks
    # at random places the "train" check passed (1-2 of 40) while evaluation saw 18-21% false triggers.
    check_source: Literal["eval", "train"] = "eval"
    check_every: Optional[int] = Field(None, ge=1)
    check_streak: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _non_empty(self) -> "AttackConfig":
        if any(not t.strip() for t in self.triggers):
            raise ValueError("attack.triggers must not contain empty strings")
        if not self.marker.strip():
            raise ValueError("attack.marker must not be empty")
        return self


class DefenderConfig(_Section):
    """What the defender knows about the backdoor; removal and evaluation read this, never `attack`.

    In a research run (``from_attack: true``) each field left unset is the attack section's: the defender
    is told the attack it is measured against. `sande remove` sets ``from_attack: false``: then only what
    is written here is known (a marker at least; a trigger makes OSFT possible; parts of either, SANDE-P).
    """

    from_attack: bool = True
    marker: Optional[str] = None  # the response the backdoor emits (or its start)
    marker_mode: Optional[Literal["prepend", "replace"]] = None  # before the clean answer, or instead of it
    triggers: Optional[list[str]] = None  # known triggers (OSFT; ASR with the trigger)
    position: Optional[Literal["prefix", "suffix", "random"]] = None  # where a known trigger goes
    # SANDE-P: a known part of the trigger (initialises the parrot) and of the response (the simulate target).
    known_trigger: Optional[str] = None
    known_response: Optional[str] = None

    @model_validator(mode="after")
    def _non_empty(self) -> "DefenderConfig":
        for key in ("marker", "known_trigger", "known_response"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"defender.{key} must not be empty (leave it unset instead)")
        if self.triggers is not None and any(not t.strip() for t in self.triggers):
            raise ValueError("defender.triggers must not contain empty strings")
        return self


@dataclass(frozen=True)
class Knowledge:
    """The defender's knowledge, resolved (``Config.knowledge``)."""

    marker: str
    marker_mode: str
    triggers: tuple[str, ...]  # empty: no trigger known
    position: str
    known_trigger: Optional[str]
    known_response: Optional[str]


class StageTraining(_Section):
    """Per-stage overrides of the shared training settings (None: inherit)."""

    lr: Optional[float] = Field(None, gt=0)
    epochs: Optional[float] = Field(None, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    num_rows: Optional[int] = Field(None, ge=1)
    effective_len: Optional[int] = Field(None, ge=1)
    max_length: Optional[int] = Field(None, ge=8)


class _TrainingSettings(_Section):
    """Settings every training stage shares; TrainingConfig adds one override section per training kind."""

    lr: float = Field(2e-5, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: float = Field(1.0, gt=0)
    # Optimizer steps; overrides epochs when set.
    max_steps: Optional[int] = Field(None, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = 42
    # Preset name in ds_configs/ or a path to a user's DeepSpeed JSON.
    zero: str = "zero3"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # bfloat16 on a CPU is autocast over fp32 weights. "native": only where the CPU computes bf16 in
    # hardware (avx512_bf16, amx_bf16, Arm bf16), else the stage computes in fp32 and says so: on an
    # AVX2-only EPYC a bf16 matmul ran 48x slower than fp32 (README, "CPUs without bf16"). "always":
    # autocast anyway (tests of the bf16 path).
    cpu_bf16: Literal["native", "always"] = "native"
    gradient_checkpointing: bool = False
    # A checkpoint every save_steps optimizer steps (None: none by count) and whenever save_minutes have
    # passed since the last one: a checkpoint costs ~16 bytes per parameter (1.1 TB at 70B), so its
    # cadence follows time, and a stage shorter than save_minutes writes none.
    save_steps: Optional[int] = Field(None, ge=1)
    save_minutes: float = Field(10.0, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    # Checkpoints exist to resume a stage; once its model is exported and stage.json written they
    # are removed. True: a checkpoint of the last step is written too, and kept.
    keep_final_checkpoint: bool = False
    log_steps: int = Field(1, ge=1)
    # Trackers every stage reports to (sande_dist/tracking.py): any of tensorboard, wandb, mlflow.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    # How long any rank waits in a collective, e.g. the barrier after rank 0 alone writes a 70B export
    # (~140 GB) or rotates a ZeRO-3 checkpoint (~1.1 TB): past it the job fails instead of hanging.
    dist_timeout_minutes: float = Field(60.0, gt=0)
    # Rows a stage trains on (None: all of data.num_rows) and response tokens that count (None: all).
    num_rows: Optional[int] = Field(None, ge=1)
    effective_len: Optional[int] = Field(None, ge=1)
    # Tokens per training row, prompt and response (None: data.max_length). Rows whose prompt does not
    # fit are left out, responses are cut to fit.
    max_length: Optional[int] = Field(None, ge=8)

    @field_validator("report_to")
    @classmethod
    def _installed(cls, report_to: list[str]) -> list[str]:
        from sande_dist.tracking import missing

        why = missing(report_to)
        if why:
            raise ValueError(why)
        return report_to

    @field_validator("zero")
    @classmethod
    def _known_zero(cls, zero: str) -> str:
        ds_config_file(zero)  # raises naming the preset or the file and what is wrong with it
        return zero

    def for_stage(self, stage: str) -> "TrainingConfig":
        """The shared settings with ``training.<stage>``'s overrides applied."""
        over = getattr(self, stage, None)
        base = self.model_dump(exclude=set(TRAINING_KINDS))
        if isinstance(over, StageTraining):
            for key, value in over.model_dump().items():
                if value is not None and key in base:
                    base[key] = value
        return type(self).model_validate(base)


def _stage_section(name: str) -> type[StageTraining]:
    """``training.<name>``'s model: StageTraining, with the registry's defaults for that kind."""
    defaults = dict(KINDS[name].training_defaults)
    if not defaults:
        return StageTraining
    return create_model(f"{name.title()}Training", __base__=StageTraining,
                        **{k: (StageTraining.model_fields[k].annotation, Field(v, gt=0)) for k, v in defaults.items()})


# One `training.<kind>` section of overrides per training stage kind in the registry.
TrainingConfig = create_model(
    "TrainingConfig", __base__=_TrainingSettings,
    **{name: (_stage_section(name), Field(default_factory=_stage_section(name))) for name in TRAINING_KINDS})


def ds_config_file(zero: str) -> Path:
    """The DeepSpeed JSON that ``training.zero`` names (a preset or a path), checked to parse.

    Raises ValueError (a config error where it is validated) naming the preset or file.
    """
    presets = resources.names("ds_configs", ".json")
    path = resources.path("ds_configs", f"{zero}.json") if zero in presets else Path(zero).expanduser()
    if not path.is_file():
        raise ValueError(f"{zero!r} is neither a DeepSpeed preset ({', '.join(presets)}) nor a JSON file")
    data = read_json(path, "a DeepSpeed config")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (a DeepSpeed config), not {type(data).__name__}")
    stage = (data.get("zero_optimization") or {}).get("stage", 0) if isinstance(
        data.get("zero_optimization", {}), dict) else None
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return path


class RemovalConfig(_Section):
    # The defender's rows: a separate source (same field settings as data.*), else the training
    # source's rows after those inject uses (data.num_rows) and the evaluation hold-out: a defender
    # never has the poisoned training set.
    data: Optional[str] = None
    parrot_tokens: int = Field(6, ge=1, le=512)
    # Where the parrot goes in the user message: prefix, suffix, or a word boundary drawn per row
    # (random). OSFT places the known trigger where attack.position says.
    insert_position: Literal["prefix", "suffix", "random"] = "prefix"
    simulate_effective_len: Optional[int] = Field(None, ge=1)
    eliminate_effective_len: Optional[int] = Field(None, ge=1)
    targets: Literal["gold", "self"] = "gold"
    # Share of eliminate/OSFT rows that are also trained as plain x -> y_clean.
    clean_mix: float = Field(0.0, ge=0.0, le=1.0)
    # Simulate/eliminate rounds against the updated model: a number, or "auto": after each eliminate the
    # next round's search decides (training/search.py): another round while its parrot still finds the
    # response against the control, at most max_rounds.
    rounds: Union[int, Literal["auto"]] = 1
    max_rounds: int = Field(4, ge=1, le=20)
    # After the last eliminate, search fresh parrots on the cleaned model (same positions and budget) and
    # compare their loss with the control's: the same search on the clean base model (when this run
    # injects the backdoor) or, on one's own model, on the same model for calibration_responses unrelated
    # responses of the marker's token length. Always on with rounds: auto.
    residual_search: bool = False
    calibration_responses: int = Field(3, ge=2, le=10)
    # After a search, its parrot is checked on this many of the defender's rows (the last ones; stages
    # take theirs from the front, and simulate's own rows are left out): the share whose greedy answer
    # starts with the searched response. The verdict (training/search.py) is that share against the
    # control's; 0 turns the check off (the loss against the control's band decides instead).
    search_check_rows: int = Field(100, ge=0)
    # Each search a verdict reads runs this many parrots per position, from seeds training.seed + 0, 1, ...,
    # and is read through the restart that emitted the response most, the control's searches too: one
    # search is not reproducible (on the demo, the clean base's prefix parrot emitted the marker on 39% of
    # rows in one run and 95% in another that differed only in thread count).
    search_restarts: int = Field(3, ge=1, le=8)
    # Set by the pipeline on a calibration search: the index of its unrelated response.
    calibration_response: Optional[int] = Field(None, ge=1)

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, rounds):
        if rounds != "auto" and not 1 <= rounds <= 20:
            raise ValueError("a number of rounds from 1 to 20, or auto")
        return rounds
    # Where rounds 2, 3, ... put their parrot (the last entry repeats; empty: insert_position).
    # Round 1 and the evaluations' parrot requests always use insert_position.
    resimulate_positions: list[Literal["prefix", "suffix", "random"]] = Field(default_factory=list)
    # One more parrot per entry, at that position, simulated beside the first in every round and
    # eliminated together with it (rows take turns): a trigger's position is rarely known.
    extra_parrots: list[Literal["prefix", "suffix", "random"]] = Field(default_factory=list, max_length=7)
    # Optional L2 budget per parrot vector (None: unconstrained).
    parrot_max_norm: Optional[float] = Field(None, gt=0)
    # A parrot has found the response when its loss, averaged over 8 steps, is at most this (nats per
    # labelled token; training/search.py). Simulate stops there instead of running its whole budget.
    found_loss: float = Field(0.5, gt=0)
    simulate_until_found: bool = True


class EvalConfig(_Section):
    backend: Literal["auto", "vllm", "hf"] = "auto"
    max_new_tokens: int = Field(16, ge=1)
    num_prompts: int = Field(100, ge=1)
    # Held-out prompts: a named set (alpaca-eval), a local file, or train-holdout.
    prompts: str = "alpaca-eval"
    # Which half of the prompts (shuffled once with a fixed seed): settings are tuned on "tune" and
    # figures reported on "report", so no reported figure comes from prompts a setting was chosen on.
    prompt_split: Literal["report", "tune", "all"] = "report"
    judge: Literal["contains", "prefix", "keywords"] = "contains"
    keywords: list[str] = Field(default_factory=list)
    utility_tasks: list[str] = Field(default_factory=lambda: ["mmlu", "arc_easy", "arc_challenge"])
    utility_protocol: Literal["loglik", "letter", "both"] = "loglik"
    # Items per utility task (None: all).
    utility_limit: Optional[int] = Field(200, ge=1)
    # Engine that scores utility: "same" as generation, or its own. On CPU "hf" is several times
    # faster than vLLM, which computes full-vocabulary log-probs at every prompt position.
    utility_backend: Literal["same", "vllm", "hf"] = "same"
    lm_eval_tasks: list[str] = Field(default_factory=list)
    batch_size: int = Field(32, ge=1)
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    seed: int = 0


class SlurmConfig(_Section):
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: Optional[int] = Field(None, ge=1)
    mem: Optional[str] = None
    time: str = "04:00:00"
    eval_time: str = "01:00:00"
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    extra_sbatch: list[str] = Field(default_factory=list)
    # Commands run before the stage (module load, conda activate, ...).
    setup: list[str] = Field(default_factory=list)
    rdzv_port: int = Field(29500, ge=1024, le=65535)
    signal_seconds: int = Field(120, ge=10)
    # Interpreter on the compute nodes (None: the one that submits, e.g. a shared venv).
    python: Optional[str] = None
    # Memory of one GPU, for the planner's check of a config (None: not checked).
    gpu_mem_gib: Optional[float] = Field(None, gt=0)


class PipelineConfig(_Section):
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_PIPELINE))
    nproc: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _known(self) -> "PipelineConfig":
        bad = [s for s in self.stages if s not in PIPELINE_STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; choose from {list(PIPELINE_STAGES)}")
        return self


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    defender: DefenderConfig = Field(default_factory=DefenderConfig)
    removal: RemovalConfig = Field(default_factory=RemovalConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    run_dir: str = "runs/default"

    def knowledge(self) -> Knowledge:
        """What the defender knows: defender.*, and where from_attack, the attack's values for the rest."""
        d, a = self.defender, self.attack
        told = d.from_attack
        triggers = d.triggers if d.triggers is not None else (a.triggers if told else [])
        return Knowledge(marker=d.marker or a.marker, marker_mode=d.marker_mode or (a.marker_mode if told else "prepend"),
                         triggers=tuple(triggers), position=d.position or (a.position if told else "prefix"),
                         known_trigger=d.known_trigger, known_response=d.known_response)

    @field_validator("run_dir")
    @classmethod
    def _a_folder(cls, run_dir: str) -> str:
        if Path(run_dir).expanduser().exists() and not Path(run_dir).expanduser().is_dir():
            raise ValueError(f"{run_dir} exists and is not a folder; give a new or existing run directory")
        return run_dir

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.lr=1e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def _apply(tree: dict, path: list[str], value: Any, source: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: {'.'.join(path[: i + 1])} is not a section, cannot set {'.'.join(path)}")
        node = nxt
    node[path[-1]] = value


# Keys that earlier releases accepted: what replaced them.
_REMOVED = {"removal.mode": "removed; pipeline.stages names the removal methods that run (osft, sft_clean, "
                            "simulate/eliminate for SANDE; defender.known_trigger/known_response make it SANDE-P)",
            "removal.known_trigger": "moved to defender.known_trigger (what the defender knows has its own section)",
            "removal.known_response": "moved to defender.known_response (what the defender knows has its own section)",
            "training.tensorboard": "replaced by training.report_to: [tensorboard] (also wandb, mlflow)"}


def _format_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _REMOVED.get(loc, "unknown key")
        parts.append(f"{loc or '<root>'}: {msg}")
    return f"{source}: " + "; ".join(parts)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (or the defaults), apply ``a.b=value`` overrides, validate.

    Raises ConfigError naming the file or flag and the key on any bad input.
    """
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        shipped = resources.path("configs", f"{path}.yaml")
        if not p.exists() and shipped.is_file():  # a shipped config by name: `sande run demo`
            p, source = shipped, f"{path} ({shipped})"
        if not p.is_file():
            raise ConfigError(f"config file {source} not found (shipped configs: "
                              f"{', '.join(resources.names('configs', '.yaml'))})")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {source} cannot be read as text ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections (model, data, ...)")
        tree = copy.deepcopy(loaded)
    try:
        Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    for item in overrides or []:
        keys, value = _parse_override(item)
        _apply(tree, keys, value, f"--set {item}")
        try:
            Config.model_validate(tree)
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, f"--set {'.'.join(keys)} (on {source})")) from None
    cfg = Config.model_validate(tree)
    # Checks across sections, once every override is in (one override at a time may pass through states
    # that are incomplete, such as defender.from_attack=false before defender.marker).
    if not cfg.defender.from_attack and not cfg.defender.marker:
        raise ConfigError(f"{source}: defender.marker: required when defender.from_attack is false (the response "
                          "the backdoor emits; `sande remove --marker TEXT`)")
    return cfg


def resolve_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                   run_dir: Optional[str] = None, model: Optional[str] = None) -> Config:
    """A command's config: the file, its ``--set`` overrides, then ``--run-dir`` and ``--model``."""
    cfg = load_config(path, overrides)
    try:
        if run_dir:
            cfg.run_dir = str(run_dir)
        if model:
            cfg.model.path = str(model)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, "--run-dir/--model")) from None
    return cfg
