"""The config tree: one nested dataclass per component, and nothing else.

Presets (``engine.presets``) are plain functions returning a ``Config``; the command line changes
single fields by dotted path (``engine.config.overrides``); ``engine.config.checks`` validates
the tree once at start-up; ``engine.config.plan`` derives everything that follows from it
(image size, taps, lr, batch arithmetic, schedule lengths, FLOPs, memory) in one frozen
``RunPlan``. Nothing derived is written back here, so the config saved with a run is exactly
what the user asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Steps of fault flags the non-finite guard keeps on the host (engine.loop.guard); debug.flag_lag
# must stay below it.
GUARD_RING = 8


@dataclass
class ModelConfig:
    arch: str = "deepmim_vit_base_patch16"  # encoder variant in engine.registry
    img_size: int = 0  # 0 = the variant's native size
    # 1-indexed encoder blocks that feed a decoder; the last must be the final block. Empty = the
    # variant's default (the paper's 6/8/10/12 for ViT-B; 1/2, 2/3, 5/6 depth for others).
    taps: list[int] = field(default_factory=list)
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    fused_decoders: bool = True  # one batched pass over all decoders; False = per-decoder loop
    # decoder attention kernel: auto (SDPA chooses) | flash | efficient | cudnn | math (one SDPA kernel) | flex
    decoder_attention: str = "auto"
    qkv_layout: str = "packed"  # packed (one GEMM, permuted views) | split (three GEMMs, copy-free q/k/v)


@dataclass
class MaskConfig:
    ratio: float = 0.75


@dataclass
class TargetConfig:
    kind: str = "pixel"  # pixel | mixed | clip | features
    norm_pix: bool = True  # MAE's per-patch normalized pixel target
    weights: list[float] = field(default_factory=list)  # per tap; empty = 1.0 each
    # clip, features: the teacher's weights, a local file or a timm hub folder (config.json + weights).
    # clip is DeepMIM-CLIP: a CLIP tower's projected patch tokens; features: any timm ViT's tokens.
    teacher: str = ""
    # the teacher's timm architecture (vit_base_patch14_dinov2, vit_base_patch16_clip_224.laion2b, ...);
    # empty = from the hub folder's config.json, or OpenAI's layout (QuickGELU); never guessed
    teacher_arch: str = ""
    teacher_head: bool = False  # features: apply the tower's projection head to every token (CLIP towers)
    feature_loss: str = "cosine"  # clip, features: cosine (2 - 2 cos, DeepMIM) | smooth_l1 (on normalized targets)
    feature_dim: int = 0  # expected teacher width; 0 = whatever the weights say
    # mixed: MAE generator = our run/checkpoint folder (a pixel-target run) or an official MAE .pth
    generator: str = ""
    generator_norm_pix: str = "auto"  # auto (read from our checkpoint) | true | false (official files)
    mix_alphas: list[float] = field(default_factory=list)  # a_k per tap; empty = 0 .. 1 evenly (0, 1/3, 2/3, 1)
    mix_space: str = "norm"  # norm (per-patch normalized pixels) | raw (pixels, normalized after mixing)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (fused; pretraining, fine-tuning) | lars (timm's; linear probing)
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    lr: float = 0.0  # absolute lr; overrides base_lr when > 0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # lars only


@dataclass
class ScheduleConfig:
    epochs: int = 1600
    warmup_epochs: float = 40.0
    min_lr: float = 0.0
    # Stop after this many optimizer steps without changing the schedule's shape (0 = run all).
    max_steps: int = 0


@dataclass
class DataConfig:
    shards: str = "data/shards"  # folder written by data_pipeline.make_shards
    loader: str = "dali"  # dali | torch (fallback)
    global_batch: int = 4096
    # per rank, per forward/backward; 0 = auto: the per-rank share of the global batch when it is at
    # most max_micro_batch, else its largest divisor that is (the rest is gradient accumulation)
    micro_batch: int = 0
    max_micro_batch: int = 64  # for micro_batch=0: what fits in a GPU's memory (the presets set it per model)
    num_threads: int = 8  # DALI threads / torch DataLoader workers per rank
    decode_device: str = "auto"  # auto (gpu when CUDA is present) | gpu | cpu
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    flip_prob: float = 0.5  # horizontal flips (0 for data whose classes a mirror changes: text, digits)
    val_shards: str = ""  # labeled validation shards (fine-tuning, probing): evaluated every epoch and at the end
    eval_batch: int = 0  # evaluation batch per rank; 0 = the training micro-batch
    # resuming mid-epoch with other data (another manifest, a superset, new contents) or another seed:
    # refuse (the default: the rest of the epoch would repeat or skip samples) | next_epoch (start the
    # next epoch with the new data; the rest of the current one is not read). At an epoch end: accepted.
    on_change: str = "refuse"
    # the order samples are read in each epoch: global (one permutation of every sample) | block (shards
    # permuted, samples shuffled within windows of block_window shards: for huge or remote data, since a
    # rank reads a few shards at a time) | auto (block for s3:// or https:// shards and for more than
    # 100 M samples, else global)
    order: str = "auto"
    block_window: int = 4
    # shards in object storage (data.shards=s3://bucket/prefix or https://...): a node-local cache
    cache_dir: str = ""  # empty = <temp dir>/deepmim-shard-cache-<user>, shared by the node's ranks
    cache_gb: float = 0.0  # 0 = auto: 2 x ranks per node x (prefetch_shards + 4) x the largest shard
    prefetch_shards: int = 8  # shards fetched ahead of need, per rank
    s3_endpoint: str = ""  # S3-compatible endpoint; empty = AWS_ENDPOINT_URL, else AWS
    # downloads of a shard whose size or checksum differs from dataset.json's before it counts as changed
    # (the run then stops, naming it: its bytes are not the ones its samples were indexed from)
    fetch_retries: int = 3
    fetch_timeout_s: float = 60.0  # per request (connect and read)
    # how long a condition of the moment (throttling, timeouts, cut connections, a full cache disk, a busy
    # lock) is waited out, with jittered backoff, before the run saves and stops with exit code 75 (nothing
    # is recorded against the data; the same command continues later). Below fault.stall_exit_s.
    fetch_patience_s: float = 600.0


@dataclass
class InitConfig:
    # fine-tuning and probing: encoder weights from a pretraining run folder (its newest complete
    # checkpoint), one checkpoint folder, or an engine.tools.export folder; empty = random init
    pretrained: str = ""


@dataclass
class FinetuneConfig:
    """Classification on top of a pretrained encoder (fine-tuning and linear probing)."""

    num_classes: int = 0  # 0 = the training shards' number of classes
    global_pool: str = "avg"  # avg (mean of patch tokens, then a new fc_norm) | token (cls, after the encoder norm)
    freeze_encoder: bool = False  # linear probing: only the head trains
    head_norm: str = "none"  # none | batchnorm (BatchNorm1d without affine before the head: MAE's linear probe)
    head_init_std: float = 2e-5  # truncated-normal std of the new head's weight
    drop_path: float = 0.1
    layer_decay: float = 0.75  # lr scale = layer_decay ** (blocks above); 1.0 = off
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0  # probability of mixup or cutmix per batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm's RandAugment policy; empty = off
    reprob: float = 0.25  # random erasing probability (per image, pixel noise, one box)
    eval_crop: float = 0.875  # evaluation: resize the short side to img_size / eval_crop, center crop img_size


@dataclass
class CheckpointConfig:
    interval: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3
    keep_every_epochs: int = 0  # also keep one checkpoint at the end of every N-th epoch (0 = off)
    # auto (newest complete checkpoint in run_dir) | never (start over; refused on a folder that holds
    # a run) | fresh (move a run already in the folder aside, then start over) | <checkpoint dir>
    resume: str = "auto"
    on_signal: bool = True  # SIGTERM/SIGUSR1: finish the step, save, exit 0 (RUN_DIR/PREEMPTED)
    # copy the state to host memory at the save's step and write it in a background thread while
    # training goes on (the marker follows once every rank's files are durable); false: write in place
    async_save: bool = True


@dataclass
class FaultConfig:
    max_bad_steps: int = 3  # this many consecutive non-finite steps -> roll back to the last checkpoint
    max_rollbacks: int = 3  # more rollbacks than this in one process -> stop with an error
    data_checks: str = "markers"  # start-up data checks: index | markers | decode
    max_bad_sample_share: float = 0.001  # stop when more of the samples than this are unreadable
    # A rank without a step for stall_factor x the median step time (at least stall_min_s) is reported,
    # with the ranks that are behind or silent; after stall_exit_s the process exits (code 4; 0 = never).
    stall_factor: float = 20.0
    stall_min_s: float = 120.0
    stall_exit_s: float = 900.0
    heartbeat_s: float = 10.0  # seconds between heartbeat files (RUN_DIR/heartbeat/), the watchdog's side channel


@dataclass
class DebugConfig:
    """Fault drills for tests and for rehearsing recovery; all empty in real runs."""

    nan_loss_steps: list[int] = field(default_factory=list)  # make the loss NaN at these optimizer steps
    nan_grad_steps: list[int] = field(default_factory=list)  # poison one gradient at these steps
    pause_before_marker_s: float = 0.0  # hold a save open before its completeness marker
    step_sleep_s: float = 0.0  # slow every optimizer step down (to interrupt runs at a chosen point)
    flag_lag: int = -1  # steps between a fault flag and the reaction; -1 = the device's (2 on GPU, 0 on CPU)


@dataclass
class LogConfig:
    interval: int = 50  # optimizer steps between metric lines (the only host-device syncs)
    level: str = "INFO"
    reconstructions: bool = True  # write reconstructions.png at the end of a run
    # CUDA only: count host-device syncs inside train_step on steps that do not log (should be 0)
    sync_debug: bool = False
    sample_keys: bool = False  # write every rank's sample keys per step to RUN_DIR/sample_keys/
    progress: str = "auto"  # tqdm bar on rank 0 (step, epoch, img/s, loss, ETA): auto (on a terminal) | on | off
    tensorboard: bool = True  # RUN_DIR/tensorboard: losses per tap, lr, speed, time shares, memory, MFU
    figure_interval: int = 0  # steps between reconstruction / similarity figures (0 = only at the end)


@dataclass
class EngineConfig:
    ds_config: str = "ds_configs/zero2_bf16.json"
    # bf16 | fp32 | auto. auto: bf16 on CUDA and on CPUs with native bf16 arithmetic (AVX512-BF16, AMX),
    # fp32 on other CPUs (where torch emulates bf16 matmuls about 10-30x slower than fp32); a resumed run
    # keeps the precision its checkpoint was trained in. Sets the DeepSpeed config's bf16.enabled.
    precision: str = "bf16"
    # torch.compile of the repeated blocks (encoder, decoders, teacher): each block class is
    # compiled once and reused, so compile time stays small; on failure training runs eager.
    # auto: on CUDA (the measured fastest path), not on the CPU (where compiling costs more than it saves)
    compile: str = "auto"  # auto | true | false
    compile_backend: str = "inductor"
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    # activation checkpointing: 0 = off, 1 = every block, k = every k-th block
    act_ckpt_encoder: int = 0
    act_ckpt_decoder: int = 0
    peak_tflops: float = 0.0  # dense bf16 peak per device for MFU; 0 = look up the device name
    # FP8 training of the encoder's linear layers (torchao float8; emulated on CPU). Opt-in and not yet
    # recommended: it must first match bf16's loss curve on a GPU (see the README's speed section).
    fp8: bool = False
    # DeepSpeed knobs changed from the command line: "zero_optimization.reduce_bucket_size=5e8" (JSON values)
    ds_overrides: list[str] = field(default_factory=list)


@dataclass
class Config:
    task: str = "pretrain"  # pretrain | finetune | linprobe (set by the preset; decides which sections matter)
    preset: str = ""
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    init: InitConfig = field(default_factory=InitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
