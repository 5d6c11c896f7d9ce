"""The demo's sample: synthetic kitchens in the EPIC layout, with labels only motion or appearance carry.

``generate_sample`` writes EPIC-layout JPEG frames (96x128, 8 fps), an EPIC-55 training-label CSV,
``EPIC_video_info.csv`` and a boxes file in the ``--boxes`` format. Each annotated segment is a 2 s
shot of a kitchen counter seen from above: a forearm and hand move the *active* object, two
distractor objects of other classes stand still. Verbs are carried by motion only, nouns by
appearance only (a shape and colours per class):

- take: the object rises off the counter;  put: it comes down onto the counter;
- open: it grows (swung towards the camera);  move: it slides sideways, left or right.

Why the sample looks the way it does (measured; random weights make the features weak): the
active object is held close to the camera (large), the motions are long, and the kitchens are
painted in muted tones close to the colour the networks subtract before their first layer, so that
flat background gives near-zero activations. With bright, contrasting kitchens the pooled features
were dominated by a constant part, which left the heads at the class prior for dozens of epochs.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from featstore.io.atomic import atomic_write_csv
from featstore.io.figures import pyplot, save_figure
from featstore.samples.annotations import (
    SegmentLabel,
    write_epic55_annotations,
    write_video_info,
)
from featstore.samples.frames import write_jpeg_video

__all__ = [
    "FULL_SAMPLE",
    "NOUNS",
    "QUICK_SAMPLE",
    "Sample",
    "SampleSpec",
    "VERBS",
    "generate_sample",
    "plot_sample",
    "sample_paths",
]

# ------------------------------------------------------------------------------------------------
# the sample's vocabulary: EPIC-55 class ids and keys, so names read as in the real dataset

VERBS: dict[int, str] = {0: "take", 1: "put", 2: "open", 9: "move"}
NOUNS: dict[int, str] = {1: "pan", 4: "plate", 5: "knife", 6: "bowl", 21: "sponge", 23: "cup"}

FRAME_HEIGHT, FRAME_WIDTH = 96, 128
FPS = 8.0
ACTION_FRAMES = 16  # annotated frames of a segment (2 s)
REST_FRAMES = 4  # still frames before and after each action: a shot starts and ends at rest
SHOT_FRAMES = REST_FRAMES + ACTION_FRAMES + REST_FRAMES
COUNTER_Y = 0.46  # the counter's top edge, as a fraction of the height

# Kitchens: (wall, cabinet doors, counter, counter stripes) RGB, muted tones near the mean colour
# the backbones and the detector subtract (Kinetics / ImageNet, about (110, 100, 95)): see the
# module docstring.
KITCHENS: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((124, 112, 102), (104, 94, 86), (112, 106, 100), (100, 95, 90)),
    ((112, 116, 118), (98, 102, 106), (122, 108, 96), (110, 98, 88)),
    ((128, 118, 98), (110, 104, 88), (106, 104, 102), (96, 94, 92)),
    ((114, 106, 112), (100, 94, 100), (118, 114, 104), (106, 102, 94)),
)
SKIN = (222, 172, 140)
ACTIVE_SCALE = 2.4  # the hand-held object is close to the camera: much bigger than the distractors
DISTRACTOR_SCALE = 0.9
LIFT = 0.42  # take / put: vertical travel, as a fraction of the height
SLIDE = 0.35  # move: horizontal travel, as a fraction of the width
OPEN_FROM, OPEN_TO = 0.6, 1.5  # open: scale of the active object before / after
ARM_ANCHOR_X = 0.82  # where the forearm enters the frame, as a fraction of the width
MARGIN = 8  # pixels of background beyond the frame on each side (camera sway)


# ------------------------------------------------------------------------------------------------
# painting


def _sprite(noun: int, scale: float) -> np.ndarray:
    """An object as an RGBA sprite (alpha 0 or 255) at ``scale`` (1.0: about 20 px across)."""
    size = max(4, int(round(24 * scale)))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    r = np.hypot(y - c, x - c)
    rgba = np.zeros((size, size, 4), np.uint8)

    def fill(mask: np.ndarray, colour: Sequence[int]) -> None:
        rgba[mask, :3] = colour
        rgba[mask, 3] = 255

    s = size / 24.0
    if noun == 1:  # pan: black disk, long handle to the right
        fill(r <= 8 * s, (40, 40, 44))
        fill(r <= 6 * s, (70, 70, 78))
        fill((np.abs(y - c) <= 1.5 * s) & (x >= c + 7 * s), (25, 25, 25))
    elif noun == 4:  # plate: white disk with a grey rim
        fill(r <= 10 * s, (175, 175, 180))
        fill(r <= 8 * s, (250, 250, 250))
    elif noun == 5:  # knife: thin silver blade, black handle
        fill((np.abs(y - c) <= 1.6 * s) & (np.abs(x - c) <= 11 * s), (205, 210, 215))
        fill((np.abs(y - c) <= 2.2 * s) & (x - c >= 3 * s) & (x - c <= 11 * s), (20, 20, 20))
    elif noun == 6:  # bowl: blue half disk, flat side up
        fill((r <= 10 * s) & (y >= c - 1 * s), (40, 80, 200))
        fill((np.abs(y - (c - 1 * s)) <= 1.2 * s) & (np.abs(x - c) <= 10 * s), (90, 130, 235))
    elif noun == 21:  # sponge: yellow block with a green scrub layer
        fill((np.abs(y - c) <= 5 * s) & (np.abs(x - c) <= 8 * s), (240, 215, 40))
        fill((y - c >= -5 * s) & (y - c <= -2 * s) & (np.abs(x - c) <= 8 * s), (40, 150, 60))
    elif noun == 23:  # cup: red mug with a handle on the left
        fill((np.abs(y - c) <= 7 * s) & (np.abs(x - c - 1 * s) <= 5.5 * s), (205, 35, 35))
        ring = np.hypot(y - c, x - (c - 5 * s))
        fill((ring <= 3.5 * s) & (ring >= 1.8 * s) & (x < c - 4 * s), (160, 25, 25))
    else:
        raise ValueError(f"no sprite for noun class {noun}")
    return rgba


def _hand_sprite(scale: float) -> np.ndarray:
    """A hand seen from above: a skin-coloured ellipse with a darker cuff."""
    h, w = max(4, int(round(14 * scale))), max(4, int(round(18 * scale)))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    inside = ((y - (h - 1) / 2) / (h / 2)) ** 2 + ((x - (w - 1) / 2) / (w / 2)) ** 2 <= 1.0
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[inside, :3] = SKIN
    rgba[inside & (y < h * 0.3), :3] = (120, 60, 60)  # sleeve
    rgba[inside, 3] = 255
    return rgba


def _paste(image: np.ndarray, sprite: np.ndarray, cy: float, cx: float) -> tuple[float, float, float, float]:
    """Draw ``sprite`` centred at (cy, cx); returns its visible box (x1, y1, x2, y2) in pixels."""
    sh, sw = sprite.shape[:2]
    top, left = int(round(cy - sh / 2)), int(round(cx - sw / 2))
    height, width = image.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + sh, height), min(left + sw, width)
    if y1 <= y0 or x1 <= x0:
        return (0.0, 0.0, 0.0, 0.0)
    patch = sprite[y0 - top:y1 - top, x0 - left:x1 - left]
    mask = patch[..., 3] > 0
    image[y0:y1, x0:x1][mask] = patch[..., :3][mask]
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(x0 + cols.min()), float(y0 + rows.min()), float(x0 + cols.max() + 1), float(y0 + rows.max() + 1))


def _draw_arm(image: np.ndarray, hand_y: float, hand_x: float, anchor: tuple[float, float], *, width: float) -> None:
    """The forearm, from below the frame (the camera wearer's body) to the hand: sleeve, then skin."""
    height, width_px = image.shape[:2]
    y, x = np.mgrid[0:height, 0:width_px].astype(np.float32)
    ay, ax = anchor
    vy, vx = hand_y - ay, hand_x - ax
    t = np.clip(((y - ay) * vy + (x - ax) * vx) / max(vy * vy + vx * vx, 1e-6), 0.0, 1.0)
    near = np.hypot(y - (ay + t * vy), x - (ax + t * vx)) <= width / 2
    image[near & (t < 0.55)] = (120, 60, 60)
    image[near & (t >= 0.55)] = SKIN


def paint_kitchen(kitchen: int, *, rng: np.random.Generator) -> np.ndarray:
    """A kitchen background: wall with cabinet doors above a striped counter; lighting varies per video."""
    wall, doors, counter, stripes = (np.array(c, np.float32) for c in KITCHENS[kitchen % len(KITCHENS)])
    # Painted with a margin, so that the camera sway of `render_shot` crops rather than wraps.
    h, w = FRAME_HEIGHT + 2 * MARGIN, FRAME_WIDTH + 2 * MARGIN
    image = np.empty((h, w, 3), np.float32)
    top = int(COUNTER_Y * FRAME_HEIGHT) + MARGIN
    image[:top] = wall
    for left in range(4, w, 32):  # cabinet doors with handles
        image[3:top - 8, left:left + 26] = doors
        image[top // 2 - 3:top // 2 + 3, left + 21:left + 23] = (60, 60, 60)
    image[top - 3:top] = stripes * 0.8  # counter edge
    image[top:] = counter
    for y in range(top + 6, h, 9):
        image[y:y + 2] = stripes
    light = rng.uniform(0.85, 1.1)
    gradient = np.linspace(1.0 + rng.uniform(-0.08, 0.08), 1.0, w, dtype=np.float32)[None, :, None]
    return np.clip(image * light * gradient, 0, 255)


@dataclass(frozen=True)
class Shot:
    """One segment's shot: the kitchen, the active object, what happens to it, the distractors."""

    kitchen: int
    verb: int
    noun: int
    start: tuple[float, float]  # (cy, cx) of the active object at rest before the action
    direction: int  # move: -1 left, +1 right
    distractors: tuple[tuple[int, float, float], ...]  # (noun, cy, cx), static
    camera: tuple[float, float]  # per-shot camera offset (egocentric head position)
    motion: float = 1.0  # share of the full travel (lift, slide, growth) the action makes


def _ease(t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return 0.5 - 0.5 * math.cos(math.pi * t)


def active_state(shot: Shot, k: int) -> tuple[float, float, float]:
    """(cy, cx, scale) of the active object at frame ``k`` of the shot (0-based)."""
    t = shot.motion * _ease((k - REST_FRAMES + 0.5) / ACTION_FRAMES)
    cy, cx = shot.start
    scale = ACTIVE_SCALE
    lift = LIFT * FRAME_HEIGHT
    if shot.verb == 0:  # take: up, off the counter
        cy -= lift * t
    elif shot.verb == 1:  # put: down, onto the counter (starts high)
        cy -= lift * (1.0 - t)
    elif shot.verb == 2:  # open: grows towards the camera
        scale *= OPEN_FROM + (OPEN_TO - OPEN_FROM) * t
    elif shot.verb == 9:  # move: slides sideways
        cx += shot.direction * SLIDE * FRAME_WIDTH * t
    else:
        raise ValueError(f"no motion for verb class {shot.verb}")
    return cy, cx, scale


def render_shot(shot: Shot, background: np.ndarray, k: int, *, rng: np.random.Generator
                ) -> tuple[np.ndarray, list[tuple[int, tuple[float, float, float, float], bool]]]:
    """Frame ``k`` of a shot and its objects' boxes.

    Returns:
        ``(image (H, W, 3) uint8, [(noun, (x1, y1, x2, y2) pixels, active), ...])``.
    """
    jitter_y, jitter_x = shot.camera
    # Head motion: the whole view sways a little, frame to frame.
    dy = jitter_y + 1.5 * math.sin(0.7 * k + jitter_x)
    dx = jitter_x + 1.5 * math.cos(0.5 * k + jitter_y)
    top, left = MARGIN - int(round(dy)), MARGIN - int(round(dx))
    image = background[top:top + FRAME_HEIGHT, left:left + FRAME_WIDTH].copy()
    boxes = []
    for noun, cy, cx in shot.distractors:
        box = _paste(image, _sprite(noun, DISTRACTOR_SCALE), cy + dy, cx + dx)
        boxes.append((noun, box, False))
    cy, cx, scale = active_state(shot, k)
    sprite_half = 12 * scale
    hand_y, hand_x = cy + dy - sprite_half * 0.7, cx + dx + sprite_half * 0.45
    _draw_arm(image, hand_y, hand_x, (FRAME_HEIGHT + 14 + dy, ARM_ANCHOR_X * FRAME_WIDTH + dx), width=6 * scale)
    box = _paste(image, _sprite(shot.noun, scale), cy + dy, cx + dx)
    _paste(image, _hand_sprite(0.7 * scale), hand_y, hand_x)
    boxes.append((shot.noun, box, True))
    noise = rng.normal(0.0, 3.0, image.shape).astype(np.float32)
    return np.clip(image + noise, 0, 255).astype(np.uint8), boxes


def sample_shot(verb: int, noun: int, kitchen: int, rng: np.random.Generator, *, motion: float = 1.0) -> Shot:
    """A random layout for a shot of ``verb`` ``noun`` in ``kitchen`` (``motion``: share of the full travel)."""
    h, w = FRAME_HEIGHT, FRAME_WIDTH
    direction = int(rng.choice((-1, 1)))
    cy = rng.uniform(0.6, 0.7) * h
    if verb == 9:  # leave room to slide
        cx = (rng.uniform(0.25, 0.35) if direction > 0 else rng.uniform(0.65, 0.75)) * w
    else:
        cx = rng.uniform(0.35, 0.65) * w
    others = [n for n in NOUNS if n != noun]
    picked = rng.choice(len(others), size=2, replace=False)
    # The distractors rest on the counter, one on each side of the active object's path.
    sides = [rng.uniform(0.06, 0.16) * w, rng.uniform(0.84, 0.94) * w]
    distractors = tuple((int(others[i]), float(rng.uniform(0.62, 0.88) * h), float(x)) for i, x in zip(picked, sides))
    camera = (float(rng.uniform(-3, 3)), float(rng.uniform(-4, 4)))
    return Shot(kitchen=kitchen, verb=verb, noun=noun, start=(float(cy), float(cx)), direction=direction,
                distractors=distractors, camera=camera, motion=motion)


# ------------------------------------------------------------------------------------------------
# the sample on disk


@dataclass(frozen=True)
class SampleSpec:
    """How big a generated sample is."""

    train_participants: tuple[str, ...]  # <= 'P25': the paper's (LFB) training split
    val_participants: tuple[str, ...]  # >= 'P26': its validation split
    videos_per_participant: int
    segments_per_video: int
    motion: float = 1.0  # share of the full travel each action makes (smaller: verbs harder to see)

    @property
    def participants(self) -> tuple[str, ...]:
        return self.train_participants + self.val_participants

    @property
    def n_segments(self) -> int:
        return len(self.participants) * self.videos_per_participant * self.segments_per_video


# 144 training segments (P01-P06) and 48 validation segments (P26-P27).
FULL_SAMPLE = SampleSpec(("P01", "P02", "P03", "P04", "P05", "P06"), ("P26", "P27"),
                         videos_per_participant=2, segments_per_video=12)
# 48 training segments (P01-P03) and 16 validation segments (P26).
QUICK_SAMPLE = SampleSpec(("P01", "P02", "P03"), ("P26",), videos_per_participant=1, segments_per_video=16)


@dataclass(frozen=True)
class Sample:
    """Where a generated sample lies."""

    root: Path
    frames: Path  # EPIC layout: frames/<participant>/rgb_frames/<video>/frame_%010d.jpg
    annotations: Path  # EPIC-55 training labels (EPIC_train_action_labels.csv)
    video_info: Path  # EPIC_video_info.csv beside it (frame rate per video)
    boxes: Path  # video_id, frame, x1, y1, x2, y2, score, label (pixels; label = EPIC noun class)
    segments: tuple[SegmentLabel, ...]


def sample_paths(root: str | Path) -> Sample:
    """The paths of a sample under ``root`` (whether or not it has been generated)."""
    root = Path(root)
    annotations = root / "annotations"
    return Sample(root=root, frames=root / "frames", annotations=annotations / "EPIC_train_action_labels.csv",
                  video_info=annotations / "EPIC_video_info.csv", boxes=root / "boxes.csv", segments=())


def _balanced_labels(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` (verb, noun) pairs covering every pair as evenly as possible, in random order."""
    pairs = [(verb, noun) for verb in VERBS for noun in NOUNS]
    pool = pairs * -(-n // len(pairs))
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def generate_sample(root: str | Path, spec: SampleSpec, *, seed: int = 0) -> Sample:
    """Write a synthetic EPIC-layout sample: JPEG frames, annotations, video info and a boxes file.

    Each video is a run of shots (``SHOT_FRAMES`` frames each) in one kitchen; each shot is one
    annotated segment: ``REST_FRAMES`` still frames, the ``ACTION_FRAMES`` annotated frames of the
    action, ``REST_FRAMES`` still frames. Labels are balanced over the (verb, noun) pairs within the
    training and within the validation participants. Same ``spec`` and ``seed``, same bytes.

    Args:
        root: the sample folder (created).
        spec: how many participants, videos and segments.
        seed: the sample's random seed.
    Returns:
        The sample's paths and segments.
    """
    paths = sample_paths(root)
    rng = np.random.default_rng(seed)
    labels = {
        "train": _balanced_labels(len(spec.train_participants) * spec.videos_per_participant
                                  * spec.segments_per_video, rng),
        "val": _balanced_labels(len(spec.val_participants) * spec.videos_per_participant
                                * spec.segments_per_video, rng),
    }
    segments: list[SegmentLabel] = []
    box_rows: list[tuple[str, int, float, float, float, float, float, int]] = []
    info_rows: list[tuple[str, int]] = []
    video_index = 0
    for participant in spec.participants:
        pool = labels["train" if participant in spec.train_participants else "val"]
        for v in range(spec.videos_per_participant):
            video = f"{participant}_{v + 1:02d}"
            video_rng = np.random.default_rng([seed, video_index])
            kitchen = video_index % len(KITCHENS)
            video_index += 1
            background = paint_kitchen(kitchen, rng=video_rng)
            shots = []
            for s in range(spec.segments_per_video):
                verb, noun = pool.pop()
                shots.append(sample_shot(verb, noun, kitchen, video_rng, motion=spec.motion))
                start = s * SHOT_FRAMES + REST_FRAMES + 1
                segments.append(SegmentLabel(uid=str(len(segments)), participant_id=participant, video_id=video,
                                             start_frame=start, stop_frame=start + ACTION_FRAMES - 1,
                                             verb_class=verb, noun_class=noun))
            # A detector's confidence in each object of a shot: steady within the shot, not telling
            # which object is the active one.
            scores = video_rng.uniform(0.6, 0.98, size=(len(shots), 3))

            def painter(index: int, shots=shots, background=background, video=video, rng=video_rng,
                        scores=scores) -> np.ndarray:
                shot_index, k = divmod(index - 1, SHOT_FRAMES)
                image, boxes = render_shot(shots[shot_index], background, k, rng=rng)
                for slot, (noun, (x1, y1, x2, y2), _active) in enumerate(boxes):
                    if x2 > x1 and y2 > y1:
                        box_rows.append((video, index, x1, y1, x2, y2, round(float(scores[shot_index, slot]), 3), noun))
                return image

            n_frames = len(shots) * SHOT_FRAMES
            write_jpeg_video(paths.frames, participant, video, n_frames, height=FRAME_HEIGHT, width=FRAME_WIDTH,
                             painter=painter)
            info_rows.append((video, n_frames))
    write_epic55_annotations(paths.annotations, segments, fps=FPS, verb_names=VERBS, noun_names=NOUNS)
    write_video_info(paths.video_info, [(video, FRAME_WIDTH, FRAME_HEIGHT, n) for video, n in info_rows], fps=FPS)
    atomic_write_csv(paths.boxes, ["video_id", "frame", "x1", "y1", "x2", "y2", "score", "label"], box_rows)
    return Sample(root=paths.root, frames=paths.frames, annotations=paths.annotations, video_info=paths.video_info,
                  boxes=paths.boxes, segments=tuple(segments))


def plot_sample(sample: Sample, path: str | Path, *, frames_per_row: int = 6) -> Path:
    """A contact sheet of the sample: the first segment of each verb, with the boxes of the boxes file.

    The active object's box (its label is the segment's noun) is drawn in green, distractors in grey.
    Reads the frames and boxes back from disk, so it shows what `featstore build` reads.
    """
    from PIL import Image

    plt = pyplot()
    with open(sample.annotations, newline="") as handle:
        rows = list(csv.DictReader(handle))
    firsts = {}
    for row in rows:
        firsts.setdefault(int(row["verb_class"]), row)
    wanted: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    picks = []
    for verb in sorted(firsts):
        row = firsts[verb]
        first, last = int(row["start_frame"]) - REST_FRAMES, int(row["stop_frame"]) + REST_FRAMES
        frames = np.linspace(first, last, frames_per_row).round().astype(int).tolist()
        picks.append((row, frames))
        for frame in frames:
            wanted[(row["video_id"], frame)] = []
    with open(sample.boxes, newline="") as handle:
        for box in csv.DictReader(handle):
            key = (box["video_id"], int(box["frame"]))
            if key in wanted:
                wanted[key].append(tuple(float(box[c]) for c in ("x1", "y1", "x2", "y2", "label")))
    fig, axes = plt.subplots(len(picks), frames_per_row, figsize=(1.9 * frames_per_row, 1.6 * len(picks)),
                             squeeze=False)
    for (row, frames), axes_row in zip(picks, axes):
        for frame, ax in zip(frames, axes_row):
            image = Image.open(sample.frames / row["participant_id"] / "rgb_frames" / row["video_id"]
                               / f"frame_{frame:010d}.jpg")
            ax.imshow(np.asarray(image))
            for x1, y1, x2, y2, label in wanted[(row["video_id"], frame)]:
                active = int(label) == int(row["noun_class"])
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.2,
                                           edgecolor="lime" if active else "0.6"))
            inside = int(row["start_frame"]) <= frame <= int(row["stop_frame"])
            ax.set_title(f"frame {frame}" + ("" if inside else " (rest)"), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes_row[0].set_ylabel(f"{row['verb']} {row['noun']}", fontsize=9)
    fig.suptitle("demo sample: one segment per verb (green: the active object's box; grey: distractors)",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
