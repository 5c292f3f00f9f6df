"""Default segmentation config (thesis §14.2, SPEC §3-4); per-modality files override a few fields.

`get_config(arg)` takes the part after ':' in `--config=configs/segment_ct.py:smoke`, variants
separated by commas:
  ''/None  the thesis' reference run: 128x128, batch 5, reference U-Net, Adam at the modality's
           learning rate, pixel BCE, no augmentation, one slice in
  'smoke'  a run of well under two minutes on a laptop CPU: 4 phantom patients, 32x32, 2 epochs
  'strong' the options beyond the thesis that patient folds showed to help (`STRONG`):
           augmentation and BCE + soft Dice
  'strong,smoke'  both: the strong options at the smoke budget
"""

import ml_collections
from ml_collections import config_dict

VARIANTS = ("smoke", "strong")

# What ':strong' sets (issue 18), chosen by the ablation by patient folds in the README (3 folds x
# 3 seeds on sts_ibsi, 32x32): augmentation lifted CT and PET, bce_dice on top lifted T1 and
# PET; 2.5D context (data.context_slices=1) on top changed no modality by more than its seed sd
# (CT -0.002, PET +0.005, T1 +0.007), so it stays an option, not part of ':strong'.
STRONG = {
    "augment.enabled": True,
    "loss": "bce_dice",
}


def parse_variants(arg: str | None) -> set[str]:
    """'strong,smoke' -> {'strong', 'smoke'}; '' / None -> set(); ValueError for an unknown one."""
    variants = {part.strip() for part in (arg or "").split(",") if part.strip()}
    unknown = sorted(variants - set(VARIANTS))
    if unknown:
        raise ValueError(
            f"unknown config variant {unknown[0]!r}; use nothing or a comma-separated choice of "
            f"{', '.join(VARIANTS)} (e.g. ':strong,smoke')"
        )
    return variants


def get_config(
    arg: str | None = None,
    modality: str = "CT",
    learning_rate: float = 1e-3,
    smoke_data_seed: int = 0,
) -> ml_collections.ConfigDict:
    """The segmentation config for one modality.

    Args:
      arg: '' / None, or comma-separated variants 'smoke', 'strong' (see the module docstring).
      modality: config.data.modality.
      learning_rate: Adam's learning rate.
      smoke_data_seed: phantom and split seed of the smoke run; with only 4 phantom patients some
        seeds leave a split without the modality (e.g. T2, which some phantom patients replace by
        STIR).
    """
    config = ml_collections.ConfigDict()
    config.experiment = "segment"
    config.seed = 0  # init, data order
    # > 1: seeds seed, seed + 1, ... trained together by one vmapped, jit-compiled step; each
    # seed's run (results, checkpoints, figures) goes to <workdir>/seed_<s>/.
    config.num_seeds = 1
    # How the seeds are batched: True jax.vmap, False one traced copy per seed in the same program
    # (same numbers); None: vmap except on CPU, where vmapped convolutions run 3-5x slower.
    config.vmap_seeds = config_dict.placeholder(bool)

    config.data = ml_collections.ConfigDict()
    config.data.source = "phantom"  # 'phantom' | 'dicom' (a DICOM root) | 'index' (ingested)
    config.data.path = config_dict.placeholder(str)  # the DICOM root or index folder
    config.data.cache_dir = config_dict.placeholder(str)  # default ~/.cache/sarcoma_jax
    config.data.modality = modality  # 'CT' | 'PT' | 'T1' | 'T2' | 'STIR'
    config.data.image_size = 128
    config.data.tumour_only = True  # slices that contain tumour (SPEC §2); False: all slices
    config.data.seed = 0  # splits (and the phantom); kept apart from config.seed
    config.data.split_scheme = "patient"  # 'patient' | 'thesis'
    # Patient-level k-fold cross-validation (`patient` scheme): 0 = off; K in 2..10 with `fold`
    # tests fold `fold` (val: 15% of all patients, drawn from the other folds; train: the rest);
    # K without `fold`, through main.py, runs every fold into <workdir>/fold_<i>/ and pools them
    # (sarcoma_jax/folds.py).
    config.data.num_folds = 0
    config.data.fold = config_dict.placeholder(int)
    config.data.phantom_patients = 12
    # 2.5D: k > 0 adds the k neighbouring slices of the series on each side as input channels
    # (2k + 1 in all; the mask is the centre slice's; edge slices repeat at a series' ends).
    config.data.context_slices = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.depth = 3
    config.model.base_filters = 8  # encoder 16, 32, 64; bottleneck 128
    config.model.downsampling = "conv"  # 'conv' (strided, the reference) | 'maxpool'
    config.model.upsampling = "zero_insert"  # 'zero_insert' (reference) | 'transpose' | 'nearest'
    config.model.eval_batch_stats = False  # True: BN with batch statistics at eval (the reference)
    # 'bfloat16': mixed precision (bf16 convolutions and activations; f32 parameters, BN
    # statistics, logits and loss). Worth it on GPUs and TPUs; on CPUs bf16 is emulated and slower.
    config.model.compute_dtype = "float32"

    # Per-image training loss (sarcoma_jax/losses.py): 'bce' (the reference: pixel BCE summed over
    # pixels), 'dice' (1 - soft Dice) or 'bce_dice' (mean pixel BCE + 1 - soft Dice, nnU-Net's).
    config.loss = "bce"

    # Augmentation of each training batch inside the train step (sarcoma_jax/augment.py), off in
    # the reference. Probabilities per example; lengths as fractions of the image side.
    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = False
    config.augment.flip_prob = 0.5  # left-right mirror
    config.augment.rotation_prob = 0.2
    config.augment.rotation_degrees = 15.0  # uniform in [-15, 15]
    config.augment.scale_prob = 0.2
    config.augment.scale_range = (0.85, 1.25)  # zoom factor, > 1 enlarges
    config.augment.elastic_prob = 0.2
    config.augment.elastic_sigma = 0.08  # smoothing of the displacement noise
    config.augment.elastic_magnitude = 0.02  # root-mean-square displacement
    config.augment.gamma_prob = 0.3
    config.augment.gamma_range = (0.7, 1.5)
    config.augment.intensity_scale_prob = 0.15
    config.augment.intensity_scale_range = (0.75, 1.25)
    config.augment.intensity_shift_prob = 0.15
    config.augment.intensity_shift = 0.1  # uniform in [-0.1, 0.1] (images are in [0, 1])
    config.augment.noise_prob = 0.15
    config.augment.noise_std = 0.05  # the std itself uniform in [0, 0.05]

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = learning_rate
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8  # TF1 AdamOptimizer's default

    # Before each evaluation, re-estimate BatchNorm's statistics as the mean over this many
    # training batches ("precise BN"; see segment/steps.py recalibrate_batch_stats); 0 evaluates
    # with the moving averages kept during training, which trail the weights.
    config.bn_recalibration_batches = 20
    config.batch_size = 5
    config.eval_batch_size = 25
    config.num_epochs = 20
    config.num_devices = 0  # data parallel over the first n local devices; 0 = all
    config.checkpoint_every_steps = 100  # and at the end of every epoch
    config.log_every_steps = 10
    config.progress_bar = True
    config.num_example_slices = 4  # test slices in segmentation_examples.png
    config.baseline_num_thresholds = 101  # intensity-threshold baseline grid on [0, 1]

    variants = parse_variants(arg)
    if "strong" in variants:
        for path, value in STRONG.items():
            *parents, field = path.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[field] = value
    if "smoke" in variants:
        config.data.phantom_patients = 4
        config.data.seed = smoke_data_seed
        config.data.image_size = 32
        config.num_epochs = 2
        config.checkpoint_every_steps = 10
        config.eval_batch_size = 10
    return config
