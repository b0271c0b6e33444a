"""Synthetic demo datasets: shapes in COCO instance format and in the ADE20K layout.

    python tools/demo/make_demo_data.py OUT_DIR [--num-train N] [--num-val M] [--size S] [--seed K]

writes, deterministically (same settings, same bytes) and in seconds, without downloading anything:

    OUT_DIR/coco/annotations/instances_{train,val}2017.json   COCO instances, polygon masks
    OUT_DIR/coco/{train,val}2017/000000000001.jpg ...
    OUT_DIR/ade/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_00000001.jpg ...
    OUT_DIR/ade/ADEChallengeData2016/annotations/{training,validation}/ADE_..._00000001.png
    OUT_DIR/demo_data.json                                    the settings, written last

Each scene is a textured, noisy background with 2 to 5 solid-coloured shapes (circle, square or rectangle,
triangle, star) of random size, position and colour, tilted by up to 20 degrees; later shapes occlude earlier
ones, and every shape keeps at least 70 % of its area visible. COCO annotations describe the visible part
(polygons, ``area`` its pixel count, ``bbox`` its tight xywh box, ``iscrowd=0``). Segmentation labels follow
ADE20K's convention for ``reduce_zero_label=True``: 0 is "unlabelled" (ignored; the generator does not use
it), 1 is the background and 2..5 the shapes, i.e. classes ``SEG_CLASSES`` after the reduction.

Importable: ``make_demo_data(out_dir, num_train=..., ...)`` generates both datasets,
``render_scene(rng, size)`` draws one scene.
"""
import argparse
import colorsys
import json
import os
import os.path as osp
import shutil
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle', 'star')
SEG_CLASSES = ('background',) + CLASSES
# Colours used to draw each class in visualisations (RGB).
PALETTE = [(220, 20, 60), (0, 130, 230), (250, 170, 30), (120, 60, 200)]
SEG_PALETTE = [(90, 90, 90)] + PALETTE

DEFAULTS = dict(num_train=320, num_val=64, size=128, seed=0)
STAMP = 'demo_data.json'
FORMAT_VERSION = 3

# Independent random streams: one per (dataset, split), one generator per image.
_STREAMS = {('coco', 'train'): 0, ('coco', 'val'): 1, ('ade', 'train'): 2, ('ade', 'val'): 3}
_MIN_VISIBLE = 0.7    # fraction of a shape's area that must stay visible
_MIN_PART = 12        # pixels: no visible fragment may be smaller
_MAX_TILT = 0.35       # radians (20 degrees): shapes are tilted, not arbitrarily rotated
_SUBPIXEL = 4         # cv2.fillPoly fixed-point bits


# ----------------------------------------------------------------------------------------- drawing
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _shape_outline(kind: str, cx: float, cy: float, r: float, angle: float, aspect: float) -> np.ndarray:
    """Vertices (N x 2, x/y in pixels) of a shape of circumradius ``r``."""
    if kind == 'circle':
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == 'square':
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        pts = np.stack([np.cos(t) * aspect, np.sin(t) / aspect], 1)    # aspect != 1: rectangle
    elif kind == 'triangle':
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t) * aspect, np.sin(t) / aspect + 0.25], 1)  # centre the box
    elif kind == 'star':
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([np.cos(t) * radius, np.sin(t) * radius], 1)
    else:
        raise ValueError(f'unknown shape {kind!r}')
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]], dtype=np.float64)
    return pts * r + np.array([cx, cy])


def _fill(outline: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    pts = np.round(outline * (1 << _SUBPIXEL)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL)
    return mask.astype(bool)


def _background(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """A low-saturation base colour with smooth blotches, a gradient and sometimes faint stripes."""
    base = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.85))
    low = rng.normal(0.0, 1.0, (5, 5, 3)).astype(np.float32)
    blotches = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC) * rng.uniform(8, 20)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * xx + np.sin(theta) * yy)[..., None] * rng.uniform(0, 50)
    img = base + blotches + ramp
    if rng.random() < 0.4:
        phi, freq = rng.uniform(0, np.pi), rng.uniform(4, 14)
        stripes = np.sin(2 * np.pi * freq * (np.cos(phi) * xx + np.sin(phi) * yy))
        img = img + stripes[..., None] * rng.uniform(4, 10)
    return img, base


def _pick_colour(rng: np.random.Generator, others: List[np.ndarray], tries: int = 64) -> np.ndarray:
    """A saturated colour far from the background and from the other shapes' colours (so occlusion
    boundaries stay visible): the first of ``tries`` candidates at RGB distance > 90, else the farthest."""
    best, best_distance = None, -1.0
    for _ in range(tries):
        colour = _hsv(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0))
        distance = min(float(np.linalg.norm(colour - other)) for other in others)
        if distance > 90:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _has_hole_or_crumb(mask: np.ndarray) -> bool:
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is not None and (hierarchy[0][:, 3] >= 0).any():
        return True           # a hole: COCO polygons cannot describe it
    num, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return bool((stats[1:num, cv2.CC_STAT_AREA] < _MIN_PART).any())


def _visible(masks: List[np.ndarray]) -> List[np.ndarray]:
    """Visible part of each mask when later masks are drawn on top of earlier ones."""
    covered = np.zeros_like(masks[0])
    out = [None] * len(masks)
    for i in range(len(masks) - 1, -1, -1):
        out[i] = masks[i] & ~covered
        covered |= masks[i]
    return out


def render_scene(rng: np.random.Generator, size: int = 128, min_objects: int = 2,
                 max_objects: int = 5) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One scene: an RGB uint8 image and ``[(class index into CLASSES, visible mask), ...]``.

    Objects are listed in drawing order; each visible mask is non-empty, hole-free, covers at least
    ``_MIN_VISIBLE`` of its shape and has no fragment smaller than ``_MIN_PART`` pixels.
    """
    img, base = _background(rng, size)
    labels: List[int] = []
    masks: List[np.ndarray] = []
    colours: List[np.ndarray] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(25):
            label = int(rng.integers(len(CLASSES)))
            r = rng.uniform(0.13, 0.25) * size
            r *= {'circle': 0.9, 'square': 1.0, 'triangle': 1.2, 'star': 1.25}[CLASSES[label]]
            aspect = rng.uniform(0.87, 1.15) if CLASSES[label] in ('square', 'triangle') else 1.0
            margin = r * 0.9 + 1
            cx, cy = rng.uniform(margin, size - margin, 2)
            tilt = rng.uniform(-_MAX_TILT, _MAX_TILT)
            mask = _fill(_shape_outline(CLASSES[label], cx, cy, r, tilt, aspect), size)
            trial = _visible(masks + [mask])
            full = masks + [mask]
            if all(v.sum() >= _MIN_VISIBLE * f.sum() and not _has_hole_or_crumb(v) for v, f in zip(trial, full)):
                break
        else:
            continue          # no room left for another shape
        colour = _pick_colour(rng, [base] + colours)
        labels.append(label)
        masks.append(mask)
        colours.append(colour)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    for mask, colour in zip(masks, colours):     # painter's order: later shapes occlude earlier ones
        theta = rng.uniform(0, 2 * np.pi)
        shade = (np.cos(theta) * xx + np.sin(theta) * yy)[..., None] * rng.uniform(0, 40)
        img = np.where(mask[..., None], colour + shade, img)
    img = img + rng.normal(0.0, 5.0, img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return img, list(zip(labels, _visible(masks)))


# ------------------------------------------------------------------------------------------ output
def _write_jpg(path: str, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    with open(path, 'wb') as f:
        f.write(buf.tobytes())


def _write_png(path: str, label: np.ndarray) -> None:
    ok, buf = cv2.imencode('.png', label)
    assert ok
    with open(path, 'wb') as f:
        f.write(buf.tobytes())


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` of a hole-free binary mask.

    In COCO coordinates pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``. The polygon runs through the
    centres of the outer half-pixels (the contour of the mask upsampled twice), which pycocotools
    rasterises back to exactly the same pixels.
    """
    upsampled = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(upsampled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        pts = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2
        if len(pts) >= 3:
            polygons.append([float(v) for v in pts.reshape(-1)])
    return polygons


def _rng(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[(dataset, split)], index])


def make_coco(root: str, num_train: int, num_val: int, size: int, seed: int) -> Dict[str, str]:
    """The COCO-format instance dataset under ``root``; returns the annotation file of each split."""
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)]
    files = {}
    for split, num in (('train', num_train), ('val', num_val)):
        img_dir = osp.join(root, f'{split}2017')
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for index in range(num):
            img, objects = render_scene(_rng(seed, 'coco', split, index), size)
            image_id = index + 1
            file_name = f'{image_id:012d}.jpg'
            _write_jpg(osp.join(img_dir, file_name), img)
            images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
            for label, mask in objects:
                ys, xs = np.nonzero(mask)
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id, category_id=label + 1,
                    segmentation=mask_to_polygons(mask), area=int(mask.sum()),
                    bbox=[x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], iscrowd=0))
        data = dict(info=dict(description=f'mmswin synthetic shapes ({split})', version=str(FORMAT_VERSION)),
                    licenses=[], images=images, annotations=annotations, categories=categories)
        path = osp.join(root, 'annotations', f'instances_{split}2017.json')
        with open(path, 'w') as f:
            json.dump(data, f, separators=(',', ':'))
        files[split] = path
    return files


def make_ade(root: str, num_train: int, num_val: int, size: int, seed: int) -> Dict[str, str]:
    """The ADE20K-layout semantic dataset under ``root`` (``.../ADEChallengeData2016``)."""
    dirs = {}
    for split, folder, num in (('train', 'training', num_train), ('val', 'validation', num_val)):
        img_dir = osp.join(root, 'images', folder)
        ann_dir = osp.join(root, 'annotations', folder)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for index in range(num):
            img, objects = render_scene(_rng(seed, 'ade', split, index), size)
            label_map = np.ones((size, size), np.uint8)        # 1: background; 0 (unlabelled) unused
            for label, mask in objects:
                label_map[mask] = label + 2
            stem = f'ADE_{split}_{index + 1:08d}'
            _write_jpg(osp.join(img_dir, stem + '.jpg'), img)
            _write_png(osp.join(ann_dir, stem + '.png'), label_map)
        dirs[split] = img_dir
    return dirs


def make_demo_data(out_dir: str, num_train: int = DEFAULTS['num_train'], num_val: int = DEFAULTS['num_val'],
                   size: int = DEFAULTS['size'], seed: int = DEFAULTS['seed']) -> dict:
    """Writes both datasets under ``out_dir`` and returns their settings (also saved as ``STAMP``).

    Folders ``coco/`` and ``ade/`` of an earlier demo generation are replaced; the function refuses to
    touch them if ``out_dir`` has no ``STAMP`` (they could be real datasets).
    """
    if num_train < 1 or num_val < 1 or size < 64:
        raise ValueError('need num_train >= 1, num_val >= 1 and size >= 64')
    stamp = osp.join(out_dir, STAMP)
    coco_root = osp.join(out_dir, 'coco')
    ade_root = osp.join(out_dir, 'ade', 'ADEChallengeData2016')
    for path in (coco_root, osp.join(out_dir, 'ade')):
        if osp.exists(path):
            if not osp.exists(stamp):
                raise FileExistsError(f'{path} exists and was not made by this script; choose another OUT_DIR')
    if osp.exists(stamp):
        os.remove(stamp)       # an interrupted run must not look complete
    for path in (coco_root, osp.join(out_dir, 'ade')):
        if osp.exists(path):
            shutil.rmtree(path)
    os.makedirs(out_dir, exist_ok=True)
    settings = dict(version=FORMAT_VERSION, num_train=num_train, num_val=num_val, size=size, seed=seed,
                    classes=list(CLASSES), seg_classes=list(SEG_CLASSES))
    make_coco(coco_root, num_train, num_val, size, seed)
    make_ade(ade_root, num_train, num_val, size, seed)
    with open(stamp, 'w') as f:
        json.dump(settings, f, indent=1)
    return settings


def existing_settings(out_dir: str) -> Optional[dict]:
    """The settings of a complete earlier generation in ``out_dir``, or None."""
    try:
        with open(osp.join(out_dir, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_demo_data(out_dir: str, **kwargs) -> dict:
    """Generates the data unless ``out_dir`` already holds a complete generation with these settings."""
    wanted = dict(DEFAULTS, **kwargs)
    current = existing_settings(out_dir)
    if current is not None and current.get('version') == FORMAT_VERSION and \
            all(current.get(k) == v for k, v in wanted.items()):
        return current
    return make_demo_data(out_dir, **wanted)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Generate the synthetic demo datasets (COCO + ADE20K layout)')
    parser.add_argument('out_dir', help='output folder, e.g. data/demo')
    parser.add_argument('--num-train', type=int, default=DEFAULTS['num_train'], help='training images per dataset')
    parser.add_argument('--num-val', type=int, default=DEFAULTS['num_val'], help='validation images per dataset')
    parser.add_argument('--size', type=int, default=DEFAULTS['size'], help='image side in pixels')
    parser.add_argument('--seed', type=int, default=DEFAULTS['seed'], help='random seed')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = make_demo_data(args.out_dir, num_train=args.num_train, num_val=args.num_val, size=args.size,
                              seed=args.seed)
    print(f"wrote {settings['num_train']} + {settings['num_val']} images of {settings['size']}x{settings['size']} "
          f"per dataset to {osp.join(args.out_dir, 'coco')} and {osp.join(args.out_dir, 'ade')}")


if __name__ == '__main__':
    main()
