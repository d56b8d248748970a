"""Make the dense-prediction benchmark: Fashion-MNIST items pasted at random positions and scales on square canvases,
written as semantic segmentation (VOC layout, out/voc) and detection (COCO JSON, out/coco); seeded, so the same
command writes the same files. The generator and its conventions are in amas/dense/scenes.py.

    python benchmarks/scenes.py --out DIR --train 8000 --val 1000 --test 1000 --size 96 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amas.dense.scenes import make_scenes  # noqa: E402
from amas.errors import AmasError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, write the scenes, print one summary line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write voc/, coco/ and scenes.json into")
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--size", type=int, default=96, help="canvas side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="item side in pixels (default 20 48 at size 96, scaled with the size)")
    p.add_argument("--objects", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"), help="items per image")
    p.add_argument("--fmnist-root", default="",
                   help="folder with Fashion-MNIST's IDX files (default: the usual places)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        m = make_scenes(a.out, a.train, a.val, a.test, size=a.size, seed=a.seed, scale=a.scale,
                        objects=tuple(a.objects), fmnist_root=a.fmnist_root)
    except AmasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {sum(m['counts'].values())} scenes {m['counts']} of {m['size']}x{m['size']} to {a.out} "
          f"(voc/, coco/, scenes.json) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
