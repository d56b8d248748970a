"""Typed run configuration: the schema and loading it (checks: config_check; YAML and dotted overrides: config_yaml)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from amas.config_check import build_section
from amas.config_yaml import apply_overrides, read_yaml
from amas.files.atomic import atomic_write_text

# what latency is timed on (amas.latency.runtimes; the int8 ones time the model quantized as amas.quantize does)
Runtime = Literal["eager", "compiled", "onnx", "compiled_int8", "onnx_int8"]
# what a per-layer latency table plans on: float runtimes only. Layers timed alone in int8 mispredict whole int8
# models (ResNet-20, batch 64, onnx_int8: median error 64%, `amas latency-table --validate`): plan on a float
# runtime and select by whole-model int8 timings (select.latency_runtime) instead
TableRuntime = Literal["eager", "compiled", "onnx"]


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass
class ModelConfig:
    """Which network to build."""

    name: str = "resnet20"
    # constructor arguments of an importable model.name 'package.module:ClassName' (num_classes and in_channels
    # are passed when the constructor takes them)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Dataset, split and augmentation."""

    # voc: a VOC-layout segmentation folder at root (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/) for
    # task=segmentation; its splits are train.txt, val.txt and test.txt (val when absent), val_size is not used.
    # coco: a COCO JSON detection folder at root (annotations/instances_{train,val,test}.json, images/) for
    # task=detection; test is val when instances_test.json is absent
    name: Literal["fashion_mnist", "cifar10", "cifar100", "svhn", "imagefolder", "synthetic", "voc",
                  "coco"] = "fashion_mnist"
    root: str = ""
    num_classes: int = field(default=0, metadata=_range(0))  # voc, coco: the model's classes, background included
    download: bool = True
    train_subset: int = field(default=0, metadata=_range(0))
    val_size: int = field(default=5000, metadata=_range(0))
    test_subset: int = field(default=0, metadata=_range(0))
    split_seed: int = 0
    augment: bool = True
    # ImageFolder training crops: RandomResizedCrop over this range of the image's area. ImageNet training uses
    # (0.08, 1); amas' stages are short fine-tunes of a trained model, where crops that small move the BatchNorm
    # statistics away from what the teacher saw (timm efficientnet_b0 at 32 px: the search student fell from 46% to
    # 17% val in 10 steps with (0.08, 1), kept 43% without crops)
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    pad: int = field(default=4, metadata=_range(0))
    flip: bool = True
    image_size: int = field(default=224, metadata=_range(8))
    num_workers: int = field(default=2, metadata=_range(0))


@dataclass
class TrainConfig:
    """Optimiser, schedule and the engine's runtime switches."""

    epochs: int = field(default=15, metadata=_range(0))
    batch_size: int = field(default=128, metadata=_range(1))
    eval_batch_size: int = field(default=512, metadata=_range(1))
    # sgd; adamw; auto: adamw for models built from depthwise/grouped convolutions or LayerNorm/GroupNorm
    # (MobileNets, EfficientNet, RegNet, ConvNeXt), sgd for plain conv+BatchNorm nets (amas.engine.optimizers)
    optimizer: Literal["sgd", "adamw", "auto"] = "sgd"
    lr: float = field(default=0.1, metadata=_range(0, lo_open=True))  # SGD's
    adamw_lr: float = field(default=1e-4, metadata=_range(0, lo_open=True))
    adamw_weight_decay: float = field(default=0.01, metadata=_range(0))
    momentum: float = field(default=0.9, metadata=_range(0, 1))
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata=_range(0))
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "onecycle"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = field(default=0.1, metadata=_range(0, 1, lo_open=True))
    warmup_epochs: float = field(default=0.0, metadata=_range(0))
    label_smoothing: float = field(default=0.0, metadata=_range(0, 1))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # training precision (amas.engine.precision): auto (bf16 on CUDA and on CPUs with native bf16, AVX512-BF16 or
    # AMX; float32 elsewhere), bf16, fp16 (CUDA only, loss-scaled) or off; true/false read as auto/off. Masks, the
    # discriminator and accuracies stay float32
    amp: Literal["auto", "bf16", "fp16", "off"] = field(default="auto", metadata={"from_bool": ("off", "auto")})
    channels_last: bool = True
    # torch.compile of the training forwards (amas.engine.compiling): on, off, or auto: compile a stage of 500+ steps
    # when its timed eager steps say the saving repays a compile (about 30 s on a 2-core CPU); evaluation runs eager
    compile: Literal["off", "on", "auto"] = field(default="auto", metadata={"from_bool": ("off", "on")})
    log_every: int = field(default=50, metadata=_range(1))
    progress: bool = True
    # the stage's first probe_steps steps are tried first: while the eval-mode validation accuracy falls by more than
    # probe_tolerance points, everything is restored and the step size (weights and masks) quartered (0: no probe)
    probe_steps: int = field(default=0, metadata=_range(0))
    probe_tolerance: float = field(default=3.0, metadata=_range(0))
    # step-size back-offs per stage: the probe's quarters, and halvings when the loss turns non-finite or jumps
    # 10x past its recent median (the last good state restored)
    max_backoffs: int = field(default=4, metadata=_range(0))
    # BatchNorm statistics re-estimated on this many training batches before each validation (0: the running
    # averages as training left them; they lag behind weights and masks that moved fast, on MobileNets/EfficientNets
    # by tens of points)
    bn_recalibration: int = field(default=0, metadata=_range(0))


def _search_train() -> TrainConfig:
    return TrainConfig(epochs=10, lr=0.01, weight_decay=2e-4, schedule="cosine", probe_steps=10,
                       bn_recalibration=10, optimizer="auto", adamw_lr=1e-4)


@dataclass
class AlignmentConfig:
    """The student's alignment with the frozen teacher, shared by search and fine-tuning: CE + KD + adversarial."""

    # student loss: ce_weight·CE + mu·KD + adv_weight·BCE(D(student), real) (+ lam·Σ cost·|mask| in search)
    ce_weight: float = field(default=1.0, metadata=_range(0))
    mu: float = field(default=1.0, metadata=_range(0))
    kd: Literal["mse", "kl"] = "mse"
    temperature: float = field(default=4.0, metadata=_range(0, lo_open=True))
    # MSE distillation and the discriminator read per-sample standardized logits: centred over the classes, and where
    # a sample's logits spread wider than standardize_cap (their standard deviation), scaled down to it (the search
    # z-scores them all on a mask-sensitive model, see mask_outlier_ratio; fine-tuning's default 0); so the loss
    # and its gradient stop growing with the logit scale (AdamW-trained MobileNetV3/EfficientNet teachers can reach
    # |logit| 20-50) while a teacher of ordinary scale is distilled as GAL's raw MSE (Fashion-MNIST ResNet-20: per-
    # sample std 2.7-5.8; a full z-score there weakens the distillation ~16x). standardize_cap 0: every sample z-scored
    # to unit std; standardize false: raw logits. KL is left raw: its gradient is bounded by T per logit whatever the
    # scale. Dense tasks' maps are z-scored whole (no cap)
    standardize: bool = True
    standardize_cap: float = field(default=6.0, metadata=_range(0))
    adv_weight: float = field(default=0.1, metadata=_range(0))
    fast_teacher: bool = True  # run the frozen teacher as a conv+BN-folded copy (torch.fx), checked against it
    # discriminator: MLP on the logits or on the globally pooled features before the classifier
    d_input: Literal["logits", "features"] = "logits"
    d_hidden: int = field(default=128, metadata=_range(1))
    d_optimizer: Literal["adam", "sgd"] = "adam"
    d_lr: float = field(default=1e-3, metadata=_range(0, lo_open=True))
    d_weight_decay: float = field(default=0.0, metadata=_range(0))
    d_steps: int = field(default=1, metadata=_range(0))
    # weight of an MSE between the student's and the teacher's final feature maps (the last global pool's input,
    # as FitNets' hints), added to the student loss; needs the pruned model's features as wide as the teacher's
    feature_kd: float = field(default=0.0, metadata=_range(0))


@dataclass
class SearchConfig(AlignmentConfig):
    """AMAS search: student with soft channel masks, distillation, adversarial alignment, sparsity."""

    train: TrainConfig = field(default_factory=_search_train)
    lam: float = field(default=1.0, metadata=_range(0))
    # masks: proximal gradient step (soft-threshold by mask_lr·lam·cost, clamp at 0), optional FISTA
    mask_lr: float = field(default=1.0, metadata=_range(0, lo_open=True))
    mask_lr_schedule: bool = True  # mask step size follows the student's learning-rate schedule (as GAL's FISTA)
    # On the first mask step the search reads how far apart the groups' mask gradients lie. Where the largest group's
    # RMS is over mask_outlier_ratio times the median group's (timm mobilenetv3_large_100 45-63x, efficientnet_b0
    # 16-34x, regnety_002 90-390x: a stem or one layer whose masks move the output far more than the rest), the
    # model is mask-sensitive: distillation and the discriminator read z-scored logits (standardize_cap 0) and no
    # mask moves more than mask_max_step per step in any group. Otherwise (ResNet-20 2x, convnext_atto 2x) logits are
    # capped at standardize_cap and only a group over mask_outlier_ratio x the median on that step is limited (on
    # ResNet-20 with every group limited and z-scored logits: -0.5 test points at a 5-epoch -70% budget; on the mobile
    # families with both relaxed: the student falls 30-50 points in the search and ends 13-20 lower). 0: every
    # model mask-sensitive
    mask_max_step: float = field(default=0.05, metadata=_range(0))
    mask_outlier_ratio: float = field(default=10.0, metadata=_range(0))
    fista: bool = True
    fista_restart: bool = True
    mask_threshold: float = field(default=0.0, metadata=_range(0))
    # the controller measures the MACs of the cut the planner would make (kept counts rounded as prune.round_to and
    # prune.min_channels round them), so the student at the end of the search is the model that gets cut
    count_rounded: bool = True
    # with target_reduction: a mask step never carries that count past the target (the channels it would zero
    # beyond it keep their values, the strongest first), so a short search lands at the target instead of past it
    hold_budget: bool = False
    # `amas search` / `amas prune` train at least this many optimiser steps: where train.epochs of a small dataset's
    # short epochs give fewer (1,500 images at batch 128: 12 steps an epoch), epochs are added, with one line. The
    # ramp and the budget controller need a few hundred steps to take the MACs without wrecking the student (timm
    # mobilenetv3_large_100 on 1,500 images: 33 steps end at 29% val, 330 at 54%, the teacher 55%). 0: train.epochs
    # as given. (amas.MaskSearch in the user's own loop: the loop's length, total_steps, is the user's)
    min_steps: int = field(default=300, metadata=_range(0))
    # the learning-rate schedule spans this many epochs (0 or fewer than train.epochs: the search's own), so a
    # search stopped part-way leaves the rate where a fine-tune that continues the schedule picks it up
    schedule_epochs: int = field(default=0, metadata=_range(0))
    # what the sparsity penalty weights each channel by: the MACs it saves, or the latency it saves by the
    # prune.latency_* table (the budget controller still steers MACs)
    penalty_cost: Literal["macs", "latency"] = "macs"
    # the penalty weights each channel by cost**penalty_power (1: as costly as it is, 0: every channel alike, the
    # architecture then follows the masks' importance alone), rescaled to the same total so lam keeps its scale
    penalty_power: float = field(default=1.0, metadata=_range(0))
    # the strongest ceil(min_keep * size) channels of every group are exempt from the penalty's shrinkage, so no
    # layer is emptied to pay for the budget (0: no floor; the controller takes the MACs from the other channels)
    min_keep: float = field(default=0.0, metadata=_range(0, 1))
    # a floor that follows the target: floor(min_keep_uniform * r * size) channels of every group, rounded up to
    # prune.round_to, are exempt as well, r the share a uniform cut to target_reduction keeps of each group (0.8: most
    # of the kept budget sits in the floors, the masks place the rest and choose which channels fill each floor)
    min_keep_uniform: float = field(default=0.0, metadata=_range(0, 1))
    # budget controller: when target_reduction > 0, adapt lam so the effective MACs reduction settles there
    target_reduction: float = field(default=0.0, metadata=_range(0, 1))
    target_ramp: float = field(
        default=0.6, metadata=_range(0, 1)
    )  # set point rises (cubic) over this part of the search
    controller_every: int = field(default=10, metadata=_range(1))
    controller_ki: float = field(default=2.0, metadata=_range(0))  # on log(lam), per update, per unit of error
    controller_kp: float = field(default=8.0, metadata=_range(0))
    controller_overshoot: float = field(default=4.0, metadata=_range(1))  # gain factor above the set point
    lam_min: float = field(default=1e-4, metadata=_range(0, lo_open=True))
    lam_max: float = field(default=1e3, metadata=_range(0, lo_open=True))


def _finetune_train() -> TrainConfig:
    return TrainConfig(epochs=5, lr=0.02, weight_decay=5e-4, schedule="cosine", probe_steps=10,
                       bn_recalibration=10, optimizer="auto", adamw_lr=5e-4)


@dataclass
class PruneConfig:
    """Turning per-channel scores into kept channels at a MACs target."""

    # fraction of the dense MACs to remove (0.5 keeps half), as search.target_reduction
    target_reduction: float = field(default=0.5, metadata=_range(0, 0.99))
    # kept channels per group rounded up to a multiple of this (8 makes CPU kernels fast)
    round_to: int = field(default=8, metadata=_range(1))
    min_channels: int = field(default=1, metadata=_range(1))
    # also prune the residual-stage channels of option-A ResNets (default: block-inner channels only, as GAL/HRank)
    residual_channels: bool = False
    # module names kept whole, with the channels of the layers around them (e.g. the blocks of a model whose ops
    # Torch-Pruning cannot trace, such as shufflenet's channel shuffle: its error names them)
    ignore: list[str] = field(default_factory=list)
    # what the planner cuts to: MACs (target_reduction) or predicted latency from a measured table (target_latency)
    cost: Literal["macs", "latency"] = "macs"
    # with cost latency: fraction of the teacher's latency to keep, at latency_batch on latency_runtime
    target_latency: float = field(default=0.5, metadata=_range(0.01, 1))
    latency_batch: int = field(default=1, metadata=_range(1))
    latency_runtime: TableRuntime = "eager"
    # where measured latency tables are cached (one JSON per model, batch, threads, runtime, device, torch version)
    latency_tables: str = "~/.cache/amas/latency"
    # with cost latency: the planner may drop a residual block whole (it becomes its shortcut)
    block_removal: bool = False
    # runtimes report.md times teacher and pruned model on, in alternating rounds at batch 1 and 64 (those installed)
    report_runtimes: list[Runtime] = field(default_factory=lambda: ["eager"])


@dataclass
class FinetuneConfig(AlignmentConfig):
    """Adversarial fine-tuning of pruned models against the frozen teacher: CE + KD + adversarial, no mask penalty.

    The same loss and optimiser settings serve the candidates (their epochs come from select.budget_epochs)
    and the selected model's final fine-tune (train.epochs).
    """

    train: TrainConfig = field(default_factory=_finetune_train)
    kd: Literal["mse", "kl"] = "kl"
    standardize_cap: float = field(default=0.0, metadata=_range(0))  # the discriminator reads z-scored logits


@dataclass
class SelectConfig:
    """Candidates cut at several MACs reductions, fine-tuned by successive halving, one chosen by a policy."""

    # MACs reductions at which candidates are cut from the searched masks (or a criterion's scores)
    levels: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7])
    # candidate-epochs spent over all candidates by successive halving (exactly this many)
    budget_epochs: int = field(default=10, metadata=_range(1))
    # budget: highest val acc with MACs ≤ bound; tolerance: fewest MACs with val acc ≥ teacher val acc − tolerance
    policy: Literal["budget", "tolerance"] = "budget"
    min_reduction: float = field(default=0.5, metadata=_range(0, 0.99))  # budget bound: MACs ≤ (1 − this) × teacher
    max_macs: int = field(
        default=0, metadata=_range(0)
    )  # budget bound in MACs per image; overrides min_reduction when > 0
    tolerance: float = field(default=0.5, metadata=_range(0))  # accuracy points below the teacher's val acc
    # cost axis of the Pareto front and of the tolerance policy: MACs, kept channels or latency (ms, at
    # latency_batch on latency_runtime, every candidate timed against the teacher in alternating rounds)
    indicator: Literal["macs", "channels", "latency"] = "macs"
    # budget bound on latency as a fraction of the teacher's (0: no latency bound, the MACs bound applies)
    max_latency: float = field(default=0.0, metadata=_range(0, 1))
    latency_batch: int = field(default=1, metadata=_range(1))
    latency_runtime: Runtime = "eager"


def _sparsity_train() -> TrainConfig:
    return TrainConfig(epochs=1, lr=0.01, weight_decay=1e-4, schedule="cosine")


def _blend_pool() -> list[str]:
    return ["l1", "l2", "fpgm", "bn_scale", "taylor", "hrank", "apoz"]


# the baseline criteria amas.criteria registers, by name (here so that the CLI lists them without importing
# Torch-Pruning; tests/criteria/test_criteria.py checks the two agree)
BASELINE_METHODS: tuple[str, ...] = (
    "l1", "l2", "fpgm", "bn_scale", "taylor", "hrank", "apoz", "random", "blend", "srr",
)


@dataclass
class CriteriaConfig:
    """Baseline channel criteria (amas.criteria): data use, slimming, blended criteria (He 2021), SRR (Wang 2021)."""

    batches: int = field(default=4, metadata=_range(1))  # training batches read by taylor, hrank and apoz
    taylor_on: Literal["bn", "weight"] = "bn"  # (g·w)² summed over BN γ,β ("gate after BN") or over the conv filter
    # network slimming: before scoring |γ|, train the model in place with lambda·Σ|γ| on the groups' BNs
    bn_sparsity: bool = False
    bn_sparsity_lambda: float = field(default=1e-5, metadata=_range(0))  # Liu et al.: 1e-5 ResNet, 1e-4 VGG
    bn_sparsity_train: TrainConfig = field(default_factory=_sparsity_train)
    # blended criteria: pool, Spearman clustering threshold, evolutionary search of the blend weights
    blend_pool: list[str] = field(default_factory=_blend_pool)
    blend_rho: float = field(
        default=0.8, metadata=_range(-1, 1)
    )  # criteria with rank correlation >= rho share a cluster
    blend_population: int = field(default=8, metadata=_range(2))
    blend_generations: int = field(default=6, metadata=_range(1))
    blend_elite: int = field(default=2, metadata=_range(1))
    blend_mutation: float = field(default=0.25, metadata=_range(0))  # std of the Gaussian mutation of a weight
    blend_val_batches: int = field(default=4, metadata=_range(1))  # held-out batches per fitness evaluation
    blend_layer_scales: bool = False  # also evolve one score scale per group (moves channels between layers)
    # structural redundancy reduction: edge when unit-normalised filters are closer than gamma; ell-hop covering.
    # gamma 0 = auto: the srr_edge_fraction quantile of all the network's pairwise filter distances
    # (one gamma for all layers)
    srr_gamma: float = field(default=0.0, metadata=_range(0, 2))
    srr_edge_fraction: float = field(default=0.05, metadata=_range(0, 1, lo_open=True))
    srr_ell: int = field(default=1, metadata=_range(1, 2))


@dataclass
class QuantConfig:
    """int8 quantization of the exported pruned model: the quantize stage of `amas prune`, after export."""

    # none: no quantize stage; ptq: int8 PT2E static quantization (pruned_int8.pt2) calibrated on training batches;
    # qat: int8 quantization-aware fine-tuning of the pruned model against the teacher (finetune's objective)
    mode: Literal["none", "ptq", "qat"] = "none"
    calib_batches: int = field(default=8, metadata=_range(1))  # training batches the calibration reads
    qat_epochs: int = field(default=1, metadata=_range(1))  # quantization-aware fine-tuning epochs (mode qat)
    qat_lr: float = field(default=1e-3, metadata=_range(0, lo_open=True))  # its SGD learning rate (cosine schedule)
    onnx: bool = False  # also write pruned_int8.onnx (ONNX Runtime static QDQ; needs the onnx extra)
    # runtimes the report times the float teacher, the float pruned model and the int8 pruned model on, in
    # alternating rounds at batch 1 and 64 (the int8 one on compiled_int8 / onnx_int8; those installed)
    report_runtimes: list[Literal["compiled", "onnx"]] = field(default_factory=lambda: ["compiled", "onnx"])


@dataclass
class Config:
    """A whole run: model, data and training settings plus the seed, and each later stage's section."""

    seed: int = 0
    # what the model does (amas.tasks): classification (CE, top-1), segmentation (per-pixel CE, 255 ignored; mean
    # IoU selects), detection (the detector's losses; box mAP selects)
    task: Literal["classification", "segmentation", "detection"] = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    criteria: CriteriaConfig = field(default_factory=CriteriaConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Load a config from YAML (optional) plus dotted overrides into the dataclass cls."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides or []))
    return build_section(cls, data, "")


def from_dict(data: dict, cls: type = Config) -> Any:
    """Build and validate a config dataclass from a nested dict."""
    return build_section(cls, data, "")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Save the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
