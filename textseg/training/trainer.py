"""`textseg train DATA --out DIR`: train the fusion model on labeled images, keep the best checkpoint.

What one step does, and why:
- a batch of random crops of images already at the model's input scale (see `datasets`), with scale
  jitter, the 8 flips/90-degree rotations (aerial tiles have no "up") and a mild colour jitter;
- prompt augmentation: every class has a list of phrasings; each batch draws one per class, so the text
  projection learns a region of the language model's space per class rather than one point, which is
  what lets unseen synonyms work. With probability `class_subset_probability` the batch asks for a
  random subset of the classes only, the others becoming background: the model must read the prompts,
  and K varies as it does for users;
- negative prompts: with probability `negative_probability` the batch also asks for one or two concepts
  the data never shows (`negative_prompts`, e.g. "car", "snow"), whose target is nowhere: without them a
  prompt for an absent concept takes the pixels of whatever present class its embedding sits nearest
  ("cloud" asked in place of water labelled the water), with them it learns to leave the pixels alone;
- loss: cross-entropy + Dice (`losses`), plus an adversarial mask-critic term with `adversarial`.
After every epoch: validation mIoU (class names as prompts), the best model saved with
`save_pretrained`'s files into `out`, and the training state written for `resume`.

The training state is `out/training_state.safetensors` (weights of the last epoch, the optimizers'
moment tensors, torch's RNG) + `out/training_state.json` (epoch, step, history, the optimizers' scalar
settings, numpy's RNG state, both configs). No pickle anywhere: resuming restores everything, optimizer
moments included, and continues at the next epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from textseg.config import parse_storage_options
from textseg.models.fusion import DEFAULT_TEXT_MODEL, FusionBackend, FusionConfig
from textseg.training import losses
from textseg.training.datasets import LabeledImages, load_labeled_images, read_dataset_gsd, split_indices
from textseg.training.evaluation import miou_report

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings, built from `textseg train` flags (`train_config_from_args`)."""

    data: str  # DATA: a labeled DEST or an images/ + masks/ folder, local or any fsspec URI
    out: str  # the model directory (best checkpoint) and the training state, local or any fsspec URI
    classes: tuple[str, ...] | None = None  # class list and order; default: DATA's own (ontology / metadata)
    # Extra training phrasings per class, added to DATA's own prompts (class name first).
    prompt_augmentation: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 16  # what two CPU cores turn around in about a second at 128 px crops
    lr: float = 2e-3  # AdamW peak; warm-up then cosine decay to 0 over the whole run
    weight_decay: float = 1e-4
    warmup_steps: int = 100  # attention layers diverge at the peak rate from random init without it
    val_fraction: float = 0.1
    seed: int = 0
    image_size: int = 256  # the model's input size (square): images are resized to it, as at inference
    crop_size: int | None = 128  # training crops at input scale: 4x cheaper than whole 256 px images
    scale_range: tuple[float, float] = (0.75, 1.33)  # crop side jitter around crop_size before resizing
    dice_weight: float = 1.0
    class_subset_probability: float = 0.25
    # Concepts absent from DATA, asked now and then beside its classes, that must claim no pixel.
    negative_prompts: tuple[str, ...] = ()
    negative_probability: float = 0.5
    adversarial: bool = False
    adversarial_weight: float = 0.02  # small: the critic should shape masks, not outvote the labels
    text_model: str = DEFAULT_TEXT_MODEL
    backbone: str | None = None  # None: the from-scratch CNN; else an AutoBackbone id for pretrained weights
    # Other FusionConfig fields (encoder_channels, embed_dim ...): the defaults train on two CPU cores.
    model_options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "auto"
    resume: bool = False
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    # fsspec options for DATA and --out, nested as `textseg label`'s (`config.parse_storage_options`).
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["prompt_augmentation"] = {k: list(v) for k, v in self.prompt_augmentation.items()}
        values["storage_options"] = sorted(self.storage_options)  # names only: values may be secrets
        return values


# -- the command line ----------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `textseg train` options; `train_config_from_args` turns the parsed namespace into a TrainConfig."""
    defaults = TrainConfig(data="", out="")
    parser.add_argument("data", metavar="DATA", help="a DEST written by `textseg label`, or images/ + masks/")
    parser.add_argument("--out", required=True, help="model directory to write (best checkpoint + state)")
    parser.add_argument("--classes", help="comma-separated class names in mask-value order (default: DATA's)")
    parser.add_argument(
        "--prompt-augmentation",
        action="append",
        default=[],
        metavar="CLASS=P1,P2|FILE",
        help="extra training phrasings of a class (repeatable), or a YAML/JSON file {class: [phrasings]}",
    )
    parser.add_argument(
        "--negative-prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a concept DATA never shows, asked now and then so that it learns to claim no pixel "
        "(repeatable)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="model input size (px)")
    parser.add_argument(
        "--crop-size", type=int, default=defaults.crop_size, help="training crop (px); 0 = whole images"
    )
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--resume", action="store_true", help="continue from --out's training state")
    parser.add_argument("--adversarial", action="store_true", help="add the adversarial mask-critic loss")
    parser.add_argument("--adversarial-weight", type=float, default=defaults.adversarial_weight)
    parser.add_argument("--text-model", default=defaults.text_model, help="HF encoder id or local directory")
    parser.add_argument(
        "--backbone", default=None, help="an AutoBackbone id or directory (default: small CNN)"
    )
    parser.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a FusionConfig field, e.g. embed_dim=96 or encoder_channels=[16,32,64,96,128]",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The parsed `textseg train` namespace -> TrainConfig (reading a --prompt-augmentation file if given)."""
    storage_options = parse_storage_options(args.storage_option)
    return TrainConfig(
        data=args.data,
        out=args.out,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()) if args.classes else None,
        prompt_augmentation=parse_prompt_augmentation(args.prompt_augmentation, storage_options),
        negative_prompts=tuple(dict.fromkeys(p.strip() for p in args.negative_prompt if p.strip())),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        seed=args.seed,
        image_size=args.image_size,
        crop_size=args.crop_size or None,
        device=args.device,
        resume=args.resume,
        adversarial=args.adversarial,
        adversarial_weight=args.adversarial_weight,
        text_model=args.text_model,
        backbone=args.backbone,
        model_options={k: json.loads(v) for k, v in _key_values(args.model_option, "--model-option").items()},
        threads=args.threads,
        storage_options=storage_options,
        progress=not args.no_progress,
    )


def parse_prompt_augmentation(
    values: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, tuple[str, ...]]:
    """`["building=buildings,roof", "phrasings.yaml"]` -> {class: phrasings}; later values add to earlier."""
    import yaml

    from textseg.training.datasets import _filesystem

    merged: dict[str, list[str]] = {}
    for value in values:
        if "=" in value:
            name, _, phrases = value.partition("=")
            mapping: Any = {name.strip(): phrases.split(",")}
        else:
            fs, path = _filesystem(value, storage_options)
            mapping = yaml.safe_load(fs.cat_file(path).decode())  # JSON is YAML too
            if not isinstance(mapping, dict):
                raise ValueError(
                    f"--prompt-augmentation file {value!r} must map class names to lists of phrasings"
                )
        for name, phrases in mapping.items():
            items = [phrases] if isinstance(phrases, str) else list(phrases)
            merged.setdefault(str(name), []).extend(str(p).strip() for p in items if str(p).strip())
    return {name: tuple(dict.fromkeys(phrases)) for name, phrases in merged.items()}


def _key_values(items: Sequence[str], flag: str) -> dict[str, str]:
    """`--model-option KEY=JSON` strings -> {KEY: JSON text}. Storage options are not read here: they go
    through `parse_storage_options`, as `textseg label`'s do (dotted keys nest, values are typed)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} {item!r} is not of the form KEY=VALUE")
        options[key] = value
    return options


# -- training ------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) per `config`; the best epoch's model lands in `config.out`.

    Returns {"best_epoch", "best_val_miou", "best_val_iou", "epochs_run", "train_seconds", "history", ...}
    where history has one entry per epoch (losses, validation mIoU, seconds).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(_resolve_device(config.device))
    out_fs, out_root = _out_filesystem(config)
    state_json, state_tensors = _read_state(out_fs, out_root) if config.resume else (None, None)
    if config.resume and state_json is None:
        raise FileNotFoundError(f"--resume: {config.out} has no {STATE_JSON}; start without --resume")

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    fusion_config = (
        FusionConfig.from_dict(state_json["fusion_config"])
        if state_json is not None
        else FusionConfig(
            text_model=config.text_model,
            backbone=config.backbone,
            image_size=(config.image_size, config.image_size),
            **({"gsd_m": read_dataset_gsd(config.data, config.storage_options)} | dict(config.model_options)),
        )
    )
    backend = FusionBackend(fusion_config, model_id=config.out)
    size = backend.input_spec.size
    dataset = load_labeled_images(
        config.data,
        size,
        classes=config.classes,
        resample=backend.input_spec.resample,
        storage_options=config.storage_options,
    )
    phrasings = _class_phrasings(dataset, config.prompt_augmentation)
    train_ids, val_ids = split_indices(len(dataset.images), config.val_fraction, config.seed)
    backend.to(device)
    phrase_embeddings = [backend.embed_prompts(list(p)).detach() for p in phrasings]
    negatives = _negative_prompts(config.negative_prompts, phrasings)
    negative_embeddings = backend.embed_prompts(list(negatives)).detach() if negatives else None
    num_classes = len(dataset.class_names)

    parameters = [p for p in backend.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    adversary = _Adversary.create(num_classes, config, device) if config.adversarial else None
    steps_per_epoch = max(1, len(train_ids) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    progress_state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "best_miou": -1.0,
        "best_epoch": 0,
        "history": [],
    }
    if state_json is not None and state_tensors is not None:
        _restore(state_json, state_tensors, backend, optimizer, adversary, rng)
        progress_state.update({k: state_json[k] for k in progress_state})

    started = time.perf_counter()
    spent_before = sum(entry["seconds"] for entry in progress_state["history"])
    for epoch in range(progress_state["epoch"] + 1, config.epochs + 1):
        epoch_start, epoch_cpu_start = time.perf_counter(), time.process_time()
        backend.train()
        order = rng.permutation(train_ids).tolist()
        sums = {"loss": 0.0, "ce": 0.0, "dice": 0.0, "adv": 0.0, "critic": 0.0}
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not config.progress,
            leave=False,
        )
        for i in bar:
            pixels, masks = augment_batch(
                dataset, order[i * config.batch_size : (i + 1) * config.batch_size], config, rng
            )
            asked, prompt_embeddings, target = _sample_prompts(
                phrase_embeddings,
                masks,
                config.class_subset_probability,
                rng,
                negative_embeddings,
                config.negative_probability,
            )
            _set_lr(
                optimizer, config.lr * _lr_factor(progress_state["step"], total_steps, config.warmup_steps)
            )
            pixel_values = backend.normalize(pixels.to(device))
            target = target.to(device)
            logits = backend.score(pixel_values, prompt_embeddings)
            loss, parts = losses.segmentation_loss(logits, target, config.dice_weight)
            if adversary is not None:
                adversarial, adversary_parts = adversary.step(pixel_values, logits, target, asked)
                loss = loss + config.adversarial_weight * adversarial
                parts.update(adversary_parts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            progress_state["step"] += 1
            parts["loss"] = loss.item()
            for key, value in parts.items():
                sums[key] += value
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.3f}")
        bar.close()

        validation = validate(backend, dataset, val_ids) if val_ids else None
        val_miou = validation["miou"] if validation and validation["miou"] is not None else None
        entry: dict[str, Any] = {
            "epoch": epoch,
            **{k: v / steps_per_epoch for k, v in sums.items()},
            "val_miou": val_miou,
            "val_iou": validation["iou"] if validation else None,
            "seconds": time.perf_counter() - epoch_start,
            # CPU time of all threads: on a shared machine wall time says more about the neighbours.
            "cpu_seconds": time.process_time() - epoch_cpu_start,
        }
        progress_state["history"].append(entry)
        progress_state["epoch"] = epoch
        score = val_miou if val_miou is not None else -entry["loss"]  # no validation: lowest training loss
        if progress_state["best_epoch"] == 0 or score > progress_state["best_miou"]:
            progress_state.update(best_miou=score, best_epoch=epoch)
            for name, payload in backend.to_files().items():
                _write(out_fs, f"{out_root}/{name}", payload)
        _write_state(out_fs, out_root, config, backend, optimizer, adversary, rng, progress_state)
        if config.progress:
            tqdm.write(
                f"epoch {epoch}: loss {entry['loss']:.4f} (ce {entry['ce']:.4f}, dice {entry['dice']:.4f})"
                + (f", val mIoU {val_miou:.4f}" if val_miou is not None else "")
                + f", {entry['seconds']:.0f}s"
            )

    best = next((e for e in progress_state["history"] if e["epoch"] == progress_state["best_epoch"]), None)
    return {
        "best_epoch": progress_state["best_epoch"],
        "best_val_miou": best["val_miou"] if best else None,
        "best_val_iou": best["val_iou"] if best else None,
        "epochs_run": progress_state["epoch"],
        "train_seconds": spent_before + (time.perf_counter() - started),
        "train_cpu_seconds": sum(entry["cpu_seconds"] for entry in progress_state["history"]),
        "class_names": list(dataset.class_names),
        "phrasings": [list(p) for p in phrasings],
        "history": progress_state["history"],
        "out": config.out,
    }


@dataclass
class _Adversary:
    """The mask critic and its optimizer; `step` trains the critic once and returns the segmenter's term."""

    critic: losses.MaskCritic
    optimizer: torch.optim.Optimizer
    num_classes: int

    @classmethod
    def create(cls, num_classes: int, config: TrainConfig, device: torch.device) -> _Adversary:
        critic = losses.MaskCritic(num_classes).to(device)
        # A slower critic with GAN-style betas: it must keep up with the segmenter, not race ahead of it.
        optimizer = torch.optim.Adam(critic.parameters(), lr=config.lr / 4, betas=(0.5, 0.999))
        return cls(critic, optimizer, num_classes)

    def step(
        self, pixel_values: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, asked: list[int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """pixel_values (B, 3, H, W), logits (B, 1 + P, H, W), target (B, H, W) in channel space
        -> (the segmenter's adversarial loss, with gradient to logits; the parts as floats)."""
        valid = (target != losses.IGNORE_INDEX).unsqueeze(1)
        fake = losses.class_maps(logits.float().softmax(dim=1), asked, self.num_classes) * valid
        real = (
            losses.class_maps(losses.one_hot_target(target, logits.shape[1]), asked, self.num_classes) * valid
        )
        critic_loss = losses.critic_loss(
            self.critic(pixel_values, real), self.critic(pixel_values, fake.detach())
        )
        self.optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.optimizer.step()
        adversarial = losses.generator_adversarial_loss(self.critic(pixel_values, fake))
        return adversarial, {"adv": adversarial.item(), "critic": critic_loss.item()}


def _class_phrasings(
    dataset: LabeledImages, augmentation: Mapping[str, Sequence[str]]
) -> list[tuple[str, ...]]:
    unknown = set(augmentation) - set(dataset.class_names)
    if unknown:
        raise ValueError(
            f"--prompt-augmentation names classes {sorted(unknown)} that DATA does not have; "
            f"its classes are {list(dataset.class_names)}"
        )
    return [
        tuple(dict.fromkeys([*prompts, *augmentation.get(name, ())]))
        for name, prompts in zip(dataset.class_names, dataset.class_prompts, strict=True)
    ]


def augment_batch(
    dataset: LabeledImages, ids: Sequence[int], config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images by id -> (pixels (B, S, S, 3) uint8, masks (B, S, S) uint8), S = crop size or image size.

    Per image: a random crop whose side is jittered by `scale_range` and resized to S (bilinear with
    antialiasing for pixels, nearest for labels), one of the 8 flips/rotations, and brightness, contrast
    and saturation each scaled by up to +-15 % (hue is left alone: it is the strongest cue for water and
    trees, and real imagery does not shift it much).
    """
    side_out = config.crop_size or config.image_size
    pixels, masks = [], []
    for index in ids:
        image, mask = dataset.images[index], dataset.masks[index]
        height, width = mask.shape
        scale = math.exp(rng.uniform(math.log(config.scale_range[0]), math.log(config.scale_range[1])))
        side = max(8, min(round(side_out * scale), height, width))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        patch = torch.from_numpy(image[top : top + side, left : left + side]).permute(2, 0, 1).float()
        labels = torch.from_numpy(mask[top : top + side, left : left + side])
        if side != side_out:
            patch = F.interpolate(patch[None], size=(side_out, side_out), mode="bilinear", antialias=True)[0]
            labels = F.interpolate(labels[None, None].float(), size=(side_out, side_out), mode="nearest")[
                0, 0
            ]
        turns = int(rng.integers(4))
        patch, labels = torch.rot90(patch, turns, (1, 2)), torch.rot90(labels, turns, (0, 1))
        if rng.random() < 0.5:
            patch, labels = patch.flip(2), labels.flip(1)
        brightness, contrast, saturation = rng.uniform(0.85, 1.15, size=3)
        patch = patch * brightness
        patch = (patch - patch.mean()) * contrast + patch.mean()
        gray = patch.mean(dim=0, keepdim=True)
        patch = (patch - gray) * saturation + gray
        pixels.append(patch.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0))
        masks.append(labels.to(torch.uint8))
    return torch.stack(pixels), torch.stack(masks)


def _negative_prompts(negatives: Sequence[str], phrasings: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The negative prompts, refused when one is also a phrasing of a class (it would be taught both ways)."""
    known = {p.lower() for group in phrasings for p in group}
    clash = sorted(n for n in negatives if n.lower() in known)
    if clash:
        raise ValueError(f"negative prompts {clash} are also phrasings of DATA's classes; drop them from one")
    return tuple(negatives)


def _sample_prompts(
    phrase_embeddings: list[torch.Tensor],
    masks: torch.Tensor,
    subset_probability: float,
    rng: np.random.Generator,
    negative_embeddings: torch.Tensor | None = None,
    negative_probability: float = 0.0,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """One phrasing per asked class -> (classes asked (1..C), prompt embeddings (P, D), target (B, H, W)).

    The target is in channel space: 0 background (also every class not asked for), p + 1 for the p-th
    asked class, 255 ignored. With probability `negative_probability`, one or two of the negative
    prompts' embeddings follow the asked classes' as channels no pixel of the target has.
    """
    num_classes = len(phrase_embeddings)
    if num_classes > 1 and rng.random() < subset_probability:
        count = int(rng.integers(1, num_classes))
        asked = sorted(int(c) + 1 for c in rng.choice(num_classes, size=count, replace=False))
    else:
        asked = list(range(1, num_classes + 1))
    embeddings = torch.stack(
        [phrase_embeddings[c - 1][int(rng.integers(len(phrase_embeddings[c - 1])))] for c in asked]
    )
    lut = torch.zeros(256, dtype=torch.long)
    lut[num_classes + 1 :] = losses.IGNORE_INDEX
    for channel, class_index in enumerate(asked, start=1):
        lut[class_index] = channel
    if negative_embeddings is not None and rng.random() < negative_probability:
        count = min(len(negative_embeddings), int(rng.integers(1, 3)))
        picked = rng.choice(len(negative_embeddings), size=count, replace=False)
        embeddings = torch.cat([embeddings, negative_embeddings[picked]])
    return asked, embeddings, lut[masks.long()]


@torch.no_grad()
def validate(
    backend: FusionBackend, dataset: LabeledImages, ids: Sequence[int], batch_size: int = 8
) -> dict[str, Any]:
    """Validation images at input size, class names as prompts, argmax -> `miou_report` at input size.

    The full-resolution, post-processed score of a finished model is `evaluation.evaluate_backend`.
    """
    backend.eval()
    device = backend.background_token.device
    embeddings = backend.embed_prompts(list(dataset.class_names))
    predictions: list[np.ndarray] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([dataset.images[i] for i in chunk])).to(device)
        logits = backend.score(backend.normalize(pixels), embeddings)
        predictions.extend(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
    return miou_report(predictions, [dataset.masks[i] for i in ids], dataset.class_names)


def _lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine to 0 at `total_steps`: a pure function of the step, so the
    schedule needs no saved state and a resumed run follows it exactly."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# -- storage of the model and the training state -------------------------------------------------------


def _out_filesystem(config: TrainConfig) -> tuple[Any, str]:
    from textseg.training.datasets import _filesystem

    fs, root = _filesystem(config.out, config.storage_options)
    return fs, root.rstrip("/")


def _write(fs: Any, path: str, payload: bytes) -> None:
    try:
        from textseg.storage import write_bytes_atomic
    except ImportError:  # storage.py is optional here; fsspec writes the same bytes
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, payload)
        return
    write_bytes_atomic(fs, path, payload)


def _optimizer_to_files(
    optimizer: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state_dict split into tensors (for safetensors) and JSON-able scalars."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    saved: Mapping[str, Any],
    prefix: str,
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
    for index, values in saved["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _write_state(
    fs: Any,
    root: str,
    config: TrainConfig,
    backend: FusionBackend,
    optimizer: torch.optim.Optimizer,
    adversary: _Adversary | None,
    rng: np.random.Generator,
    progress_state: Mapping[str, Any],
) -> None:
    tensors = {f"model.{k}": v for k, v in backend.trainable_state_dict().items()}
    optimizer_tensors, optimizer_json = _optimizer_to_files(optimizer, "optimizer")
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    document: dict[str, Any] = {
        "format": STATE_FORMAT,
        **progress_state,
        "train_config": config.to_json(),
        "fusion_config": backend.config.to_dict(),
        "optimizer": optimizer_json,
        "numpy_rng": rng.bit_generator.state,
    }
    if adversary is not None:
        critic_state = adversary.critic.state_dict()
        tensors.update({f"critic.{k}": v.detach().cpu().contiguous() for k, v in critic_state.items()})
        critic_tensors, document["critic_optimizer"] = _optimizer_to_files(
            adversary.optimizer, "critic_optimizer"
        )
        tensors.update(critic_tensors)
    # Tensors first: a reader that finds the JSON for epoch n also finds epoch n's tensors.
    _write(fs, f"{root}/{STATE_TENSORS}", save_safetensors(tensors))
    _write(fs, f"{root}/{STATE_JSON}", (json.dumps(document, indent=1) + "\n").encode())


def _read_state(fs: Any, root: str) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    if not fs.exists(f"{root}/{STATE_JSON}"):
        return None, None
    document = json.loads(fs.cat_file(f"{root}/{STATE_JSON}"))
    if document.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{root}/{STATE_JSON} has format {document.get('format')}, this textseg reads {STATE_FORMAT}"
        )
    return document, load_safetensors(fs.cat_file(f"{root}/{STATE_TENSORS}"))


def _restore(
    document: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    backend: FusionBackend,
    optimizer: torch.optim.Optimizer,
    adversary: _Adversary | None,
    rng: np.random.Generator,
) -> None:
    device = backend.background_token.device
    backend.load_trainable_state_dict(
        {k.removeprefix("model."): v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    )
    _optimizer_from_files(optimizer, tensors, document["optimizer"], "optimizer")
    if adversary is not None:
        if "critic_optimizer" not in document:
            raise ValueError(
                "--resume --adversarial: the saved run trained without the critic; resume without it"
            )
        critic_state = {k.removeprefix("critic."): v for k, v in tensors.items() if k.startswith("critic.")}
        adversary.critic.load_state_dict(critic_state)
        _optimizer_from_files(adversary.optimizer, tensors, document["critic_optimizer"], "critic_optimizer")
    torch.set_rng_state(tensors["rng.torch"])
    rng.bit_generator.state = document["numpy_rng"]
