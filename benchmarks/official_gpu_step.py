"""Time ONE training step of the unmodified official iBOT code on a GPU, fp16 AMP (the official default).

    python benchmarks/official_gpu_step.py                      # vit-s16-gpu settings on cuda
    python benchmarks/official_gpu_step.py --device cpu --batch 2 --local_crops 2 --steps 1 --warmup 1

The official modules (``main_ibot``, ``models``, ``utils``, ``loader``) are imported, unmodified,
through the side-by-side harness ``official_ref/harness/bench_train_step.py`` (its import stubs and
its 1-process gloo group); nothing official is copied here. ``official_ref`` is looked for in
``--official_ref``, ``$IBOT_OFFICIAL_REF``, ``<repo>/shared/official_ref``, ``<repo>/../shared/official_ref``;
when absent, one JSON line ``{"error": ...}`` is printed and the exit status is 2.

Settings (``benchmarks/train_step.py --config vit-s16-gpu``): ViT-S/16 (drop_path 0.1, MIM), iBOTHead
out_dim = patch_out_dim = 8192, shared head, norm_last_layer False, batch 64, 2 x 224 + 10 x 96 random-normal
crops with the official ImageFolderMask block masks (pred_ratio [0, 0.3], var [0, 0.2]), AdamW on the official
param groups and cosine schedules at epoch 1 (last layer not frozen), clip 3.0. Models, loss and data are
built as main_ibot.train_ibot builds them (``cudnn.benchmark = True``), without DDP (one device).

The timed step is main_ibot.train_one_epoch's fp16 branch: copy crops and masks to the device, then under
fp16 autocast the teacher forward, student forward (global crops, masked), student forward (local crops),
loss; ``loss.item()``; ``scaler.scale(loss).backward()``, ``scaler.unscale_``, clip, cancel last-layer
grads, ``scaler.step``, ``scaler.update``, EMA, synchronize and read the losses. Like the CPU harness it
leaves out the logging-only statistics (argmax accuracy, gathers). A GradScaler step that finds inf/NaN
gradients skips the optimizer (the scale halves): ``skipped_steps`` counts those among the timed steps.

The LAST line printed is one JSON object: ``images_per_s`` (batch / median step), ``s_per_step``,
``peak_gpu_allocated_mb`` / ``peak_gpu_reserved_mb`` (whole run, CUDA only), ``peak_rss_mb``.
"""

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH, OUT_DIM, N_GLOBAL, GLOBAL_SIZE, LOCAL_SIZE = 16, 8192, 2, 224, 96
EPOCHS, ITERS_PER_EPOCH, START_EPOCH = 800, 100, 1
LR, MIN_LR, WARMUP_EPOCHS, WD, WD_END, MOMENTUM_TEACHER = 5e-4, 1e-6, 10, 0.04, 0.4, 0.996
CLIP_GRAD, FREEZE_LAST_LAYER, SEED = 3.0, 1, 0
N_DISTINCT_BATCHES = 4  # made before timing and cycled, like train_step.py


def find_official_ref(explicit):
    candidates = [explicit, os.environ.get("IBOT_OFFICIAL_REF"), os.path.join(REPO, "shared", "official_ref"),
                  os.path.join(REPO, os.pardir, "shared", "official_ref")]
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, "harness", "bench_train_step.py")):
            return os.path.abspath(folder)
    return None


def import_harness(official_ref):
    """The CPU harness module: importing it puts its stubs and the official code on sys.path."""
    sys.path.insert(0, os.path.join(official_ref, "harness"))
    if not os.environ.get("IBOT_OFFICIAL") and os.path.isfile(os.path.join(official_ref, "ibot", "main_ibot.py")):
        os.environ["IBOT_OFFICIAL"] = os.path.join(official_ref, "ibot")
    return importlib.import_module("bench_train_step")


def init_process_group(harness, backend):
    import torch.distributed as dist

    if backend == "gloo":  # gloo's all_reduce takes CUDA tensors too (the loss all-reduces its centers)
        harness.init_dist()
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="ibot_pg_"), "pg")
        dist.init_process_group(backend, init_method="file://" + store, rank=0, world_size=1)


def build(harness, args, device):
    """Student, teacher (+ heads), loss, optimizer and schedules in main_ibot.train_ibot's order."""
    import torch

    models, utils, head_cls = harness.models, harness.utils, harness.iBOTHead
    student = models.__dict__[args.arch](patch_size=PATCH, drop_path_rate=0.1, return_all_tokens=True,
                                         masked_im_modeling=True)
    teacher = models.__dict__[args.arch](patch_size=PATCH, return_all_tokens=True)
    dim = student.embed_dim
    head = dict(patch_out_dim=OUT_DIM, norm=None, act="gelu")
    student = utils.MultiCropWrapper(student, head_cls(dim, OUT_DIM, norm_last_layer=False, shared_head=True, **head))
    teacher = utils.MultiCropWrapper(teacher, head_cls(dim, OUT_DIM, shared_head=True, **head))
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    loss = harness.main_ibot.iBOTLoss(OUT_DIM, OUT_DIM, N_GLOBAL, args.local_crops, 0.04, 0.07, 0.04, 0.07,
                                      30, EPOCHS).to(device)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    lr = utils.cosine_scheduler(LR * args.batch / 256.0, MIN_LR, EPOCHS, ITERS_PER_EPOCH,
                                warmup_epochs=WARMUP_EPOCHS)
    wd = utils.cosine_scheduler(WD, WD_END, EPOCHS, ITERS_PER_EPOCH)
    momentum = utils.cosine_scheduler(MOMENTUM_TEACHER, 1, EPOCHS, ITERS_PER_EPOCH)
    return student, teacher, loss, optimizer, (lr, wd, momentum)


def make_batches(harness, args, n):
    """``n`` (images, masks) batches: crops (B, 3, s, s) random normal; masks (B, 14, 14) bool per global crop."""
    import torch

    sizes = [GLOBAL_SIZE] * N_GLOBAL + [LOCAL_SIZE] * args.local_crops
    dataset = harness.ImageFolderMask("unused-root", transform=None, crop_sizes=sizes, patch_size=PATCH,
                                      pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2],
                                      pred_aspect_ratio=(0.3, 1 / 0.3), pred_shape="block", pred_start_epoch=0)
    dataset.set_epoch(START_EPOCH)
    pin = args.device.startswith("cuda")
    batches = []
    for k in range(n):
        images = [torch.randn(args.batch, 3, s, s) for s in sizes]
        _, _, masks = torch.utils.data.default_collate([dataset[k * args.batch + i] for i in range(args.batch)])
        if pin:  # the official DataLoader has pin_memory=True
            images, masks = [x.pin_memory() for x in images], [m.pin_memory() for m in masks]
        batches.append((images, masks))
    return batches


def train_step(it, batch, parts, scaler, device, n_global):
    """One iteration of main_ibot.train_one_epoch, fp16 branch. Returns (loss, cls, patch, skipped)."""
    import torch

    student, teacher, ibot_loss, optimizer, (lr_s, wd_s, momentum_s), params_q, params_k, utils = parts
    epoch = it // ITERS_PER_EPOCH
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr_s[it]
        if i == 0:  # only the first group is regularized
            group["weight_decay"] = wd_s[it]
    images = [im.to(device, non_blocking=True) for im in batch[0]]
    masks = [m.to(device, non_blocking=True) for m in batch[1]]
    # == torch.cuda.amp.autocast(True) of main_ibot, for any device type
    with torch.autocast(device_type=device.type, dtype=torch.float16):
        teacher_output = teacher(images[:n_global])
        student_output = student(images[:n_global], mask=masks[:n_global])
        student.backbone.masked_im_modeling = False
        student_local_cls = student(images[n_global:])[0] if len(images) > n_global else None
        student.backbone.masked_im_modeling = True
        all_loss = ibot_loss(student_output, teacher_output, student_local_cls, masks, epoch)
        loss = all_loss.pop("loss")
    if not math.isfinite(loss.item()):
        raise SystemExit(f"Loss is {loss.item()}, stopping training")
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    utils.clip_gradients(student, CLIP_GRAD)
    utils.cancel_gradients_last_layer(epoch, student, FREEZE_LAST_LAYER)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        m = momentum_s[it]
        for param_q, param_k in zip(params_q, params_k):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item(), all_loss["cls"].item(), all_loss["patch"].item(), scaler.get_scale() < scale


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--arch", default="vit_small", help="official model name (vit_small = ViT-S)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--local_crops", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (cudnn autotuning included)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dist_backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--official_ref", default=None, help="folder holding harness/ and ibot/")
    args = ap.parse_args()
    assert args.steps >= 1 and args.warmup >= 0

    official_ref = find_official_ref(args.official_ref)
    if official_ref is None:
        msg = "official_ref not found (--official_ref, $IBOT_OFFICIAL_REF, <repo>/shared, <repo>/../shared)"
        print(msg, file=sys.stderr)
        print(json.dumps({"impl": "official-ibot-pytorch-fp16-amp", "error": msg}), flush=True)
        sys.exit(2)
    harness = import_harness(official_ref)  # imports torch and the official modules
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # as main_ibot.train_ibot
    init_process_group(harness, args.dist_backend)
    harness.utils.fix_random_seeds(SEED)
    student, teacher, ibot_loss, optimizer, schedules = build(harness, args, device)
    params_q, params_k = harness.common_params(student, teacher)
    n_total = args.warmup + args.steps
    batches = make_batches(harness, args, min(n_total, N_DISTINCT_BATCHES))
    # == torch.cuda.amp.GradScaler() of main_ibot (default settings), for any device type
    scaler = torch.amp.GradScaler(device.type)
    parts = (student, teacher, ibot_loss, optimizer, schedules, params_q, params_k, harness.utils)
    print(f"official code: {os.environ.get('IBOT_OFFICIAL') or official_ref}; torch {torch.__version__}; "
          f"device {device}; student params {sum(p.numel() for p in student.parameters())}", file=sys.stderr)

    times, losses, skipped = [], [], 0
    for k in range(n_total):
        it = START_EPOCH * ITERS_PER_EPOCH + k
        start = time.perf_counter()
        loss_v, cls_v, patch_v, was_skipped = train_step(it, batches[k % len(batches)], parts, scaler, device,
                                                         N_GLOBAL)
        elapsed = time.perf_counter() - start
        losses.append(loss_v)
        if k >= args.warmup:
            times.append(elapsed)
            skipped += int(was_skipped)
        print(f"step {k} ({'timed' if k >= args.warmup else 'warmup'}) {elapsed:.3f}s loss {loss_v:.4f} "
              f"(cls {cls_v:.4f} patch {patch_v:.4f}) scale {scaler.get_scale():g}", file=sys.stderr, flush=True)

    median = statistics.median(times)
    result = {
        "impl": "official-ibot-pytorch-fp16-amp",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": args.arch,
        "batch": args.batch,
        "crops": f"{N_GLOBAL}x{GLOBAL_SIZE}+{args.local_crops}x{LOCAL_SIZE}",
        "images_per_s": round(args.batch / median, 3),
        "s_per_step": round(median, 4),
        "s_per_step_min": round(min(times), 4),
        "s_per_step_max": round(max(times), 4),
        "steps": args.steps,
        "warmup": args.warmup,
        "skipped_steps": skipped,
        "loss_scale": scaler.get_scale(),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_gpu_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if device.type == "cuda" else None,
        "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
        if device.type == "cuda" else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "dist_backend": args.dist_backend,
        "torch": torch.__version__,
    }
    torch.distributed.destroy_process_group()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
