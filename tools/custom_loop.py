"""A plain PyTorch loop that prunes with amas.MaskSearch: search masks, cut, fine-tune, export a .pt2.

    python tools/custom_loop.py --model tv:resnet18 --weights my_resnet18.pth --data /data/imagenette \
        --image-size 64 --target 0.5 --epochs 4 --finetune-epochs 2 --out runs/custom
    python tools/custom_loop.py --model resnet20 --weights plain.pth --synthetic 256 --out /tmp/custom   # try it

--data is an ImageFolder tree (train/ with one folder per class); --synthetic N generates N learnable images.
Writes OUT/pruned.pt2 (runs without amas) and OUT/summary.json. Everything but the MaskSearch lines is the
user's own training loop.
"""

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import amas
from amas.channels.cost import count
from amas.models import create_model

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", required=True), p.add_argument("--weights", required=True), p.add_argument("--out")
p.add_argument("--data"), p.add_argument("--synthetic", type=int), p.add_argument("--image-size", type=int, default=32)
p.add_argument("--classes", type=int, default=4), p.add_argument("--in-channels", type=int, default=3)
p.add_argument("--target", type=float, default=0.5), p.add_argument("--round-to", type=int, default=8)
p.add_argument("--epochs", type=int, default=2), p.add_argument("--finetune-epochs", type=int, default=1)
p.add_argument("--lr", type=float, default=0.01), p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--controller-every", type=int, help="steps per budget-controller update (default: 1 for searches "
               "under 1000 steps, else 10)"), p.add_argument("--mask-lr", type=float, default=1.0)
p.add_argument("--controller-ki", type=float, default=2.0), p.add_argument("--controller-kp", type=float, default=8.0)
a = p.parse_args()
size = a.image_size
if a.synthetic:  # class k: a bright quadrant k on noise
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, a.classes, (a.synthetic,), generator=g)
    x = torch.randn(a.synthetic, a.in_channels, size, size, generator=g) * 0.3
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k % 4, 2)
        x[i, :, r * size // 2:(r + 1) * size // 2, c * size // 2:(c + 1) * size // 2] += 1.0
    data = TensorDataset(x, y)
else:
    from torchvision import datasets, transforms
    data = datasets.ImageFolder(pathlib.Path(a.data) / "train", transforms.Compose([
        transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406],
                                                                                     [0.229, 0.224, 0.225])]))
    a.classes, a.in_channels = len(data.classes), 3
loader = DataLoader(data, batch_size=a.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
shape = (a.in_channels, size, size)

teacher = create_model(a.model, num_classes=a.classes, in_channels=a.in_channels)
teacher.load_state_dict(torch.load(a.weights, map_location="cpu", weights_only=True))
teacher.eval()  # the fine-tuning below distils from it (MaskSearch leaves the teacher's mode as it finds it)
student = create_model(a.model, num_classes=a.classes, in_channels=a.in_channels)
student.load_state_dict(teacher.state_dict())
steps = a.epochs * len(loader)
every = a.controller_every or (1 if steps < 1000 else 10)
search = amas.MaskSearch(student, teacher, shape, a.target, total_steps=steps, lr=a.lr,
                         round_to=a.round_to, controller_every=every, mask_lr=a.mask_lr,
                         controller_ki=a.controller_ki, controller_kp=a.controller_kp, hold_budget=True)
opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
student.train()
for epoch in range(a.epochs):
    for x, y in loader:
        loss = search.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step(lr=opt.param_groups[0]["lr"])
    print(f"search epoch {epoch + 1}: loss {loss.item():.3f}, MACs reduction {100 * search.macs_reduction:.1f}%")

planned = search.cost.macs({n: len(v) for n, v in search.plan(a.target, a.round_to).items()})
small = search.cut(a.target, round_to=a.round_to)
search.close()
opt = torch.optim.SGD(small.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
small.train()
for _ in range(a.finetune_epochs):  # plain fine-tuning: CE plus distillation from the teacher
    for x, y in loader:
        with torch.no_grad():
            t = teacher(x)
        out = small(x)
        loss = F.cross_entropy(out, y) + F.mse_loss(out, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
small.eval()

out_dir = pathlib.Path(a.out or "runs/custom_loop")
out_dir.mkdir(parents=True, exist_ok=True)
prog = torch.export.export(small, (torch.zeros(2, *shape),))
torch.export.save(prog, out_dir / "pruned.pt2")
summary = {"search_macs_reduction": search.macs_reduction, "planned_macs": planned,
           "cut_macs": count(small, shape)[0], "dense_macs": count(teacher, shape)[0], "target": a.target}
(out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary))
