"""Zoo coverage: does se_inject place units in every convolutional timm / torchvision model?

Run:  python benchmarks/zoo.py [--out benchmarks/zoo.jsonl] [--limit N] [--only PATTERN] [--workers 2]

For each model of the convolutional timm families (CONV_FAMILIES) and each torchvision
classification model: build it on the meta device, trace it, find sites per rule, inject at the
default position, and check Eq. 5; models that already hold SE-like gates are also injected
with ``existing="stack"`` (what the user asks for to add units anyway). Models under
``--small-params`` (30M) are then built with real weights and injected, and one forward and
backward run at a small input; the largest eval-mode output difference of the preserve
initialisation is recorded. One JSON line per model goes to ``--out`` (existing lines are kept
and their models skipped, so an interrupted run resumes); a per-family table is printed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import multiprocessing as mp
import platform
import re
import time
import traceback
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

# timm modules whose models are convolutional networks (or conv-dominated hybrids).
CONV_FAMILIES = (
    "byobnet",
    "convmixer",
    "convnext",
    "cspnet",
    "densenet",
    "dla",
    "dpn",
    "edgenext",
    "efficientnet",
    "efficientvit_mit",
    "efficientvit_msra",
    "fasternet",
    "fastvit",
    "ghostnet",
    "hardcorenas",
    "hgnet",
    "hrnet",
    "inception_next",
    "inception_resnet_v2",
    "inception_v3",
    "inception_v4",
    "lcnetv2",
    "mambaout",
    "maxxvit",
    "metaformer",
    "mobilenetv3",
    "mobilenetv5",
    "mobilevit",
    "nasnet",
    "nextvit",
    "nfnet",
    "pnasnet",
    "rdnet",
    "regnet",
    "repghost",
    "repvit",
    "res2net",
    "resnest",
    "resnet",
    "resnetv2",
    "rexnet",
    "selecsls",
    "senet",
    "shvit",
    "sknet",
    "starnet",
    "swiftformer",
    "tresnet",
    "vgg",
    "vovnet",
    "xception",
    "xception_aligned",
)


def model_list(only: str | None) -> list[tuple[str, str]]:
    import timm
    import torchvision

    names = [(module, name) for module in CONV_FAMILIES for name in timm.list_models(module=module)]
    names += [  # torchvision's classification CNNs (its ViT and Swin transformers are not)
        ("torchvision", f"torchvision:{n}")
        for n in torchvision.models.list_models(module=torchvision.models)
        if not n.startswith(("vit_", "swin_"))
    ]
    return [(f, n) for f, n in names if only is None or fnmatch.fnmatch(n, only)]


def _small_inputs(model) -> list[int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    own = (cfg.get("input_size") or (3, 224, 224))[-1]
    minimum = (cfg.get("min_input_size") or (3, 64, 64))[-1]
    return sorted({max(64, minimum), 128, own, 299})


def check(family: str, name: str, small_params: float) -> dict:
    import torch

    import se_inject

    row: dict = {"family": family, "model": name}
    start = time.perf_counter()
    try:
        meta = se_inject.load_model(name, device="meta")
    except Exception as err:  # a model timm itself cannot build on meta is not ours to count
        row.update(status="not built", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return row
    row["params"] = sum(p.numel() for p in meta.parameters())
    options = {"existing": "skip", "r": 16}
    try:
        for _ in range(3):
            try:
                result = se_inject.retrofit(meta, model_name=name, **options)
                break
            except se_inject.NoSitesError as err:
                if "already has an SE-like gate" not in str(err):
                    raise
                row["already_gated"] = True
                options["existing"] = "stack"
            except se_inject.ConfigError as err:
                # r=16 is wider than a thin unit (8 or 12 channels): the user would pick a smaller r
                narrowest = re.search(r"use r <= (\d+)", str(err))
                if not narrowest:
                    raise
                options["r"] = 2 ** int(math.log2(int(narrowest.group(1))))
        else:
            raise se_inject.ConfigError("no working options found")
        row["r"] = options["r"]
    except se_inject.UntraceableModelError as err:
        row.update(status="untraceable", reason=str(err)[:300])
        return row
    except se_inject.SEInjectError as err:
        row.update(status="no units", reason=f"{type(err).__name__}: {str(err)[:300]}")
        return row
    except Exception as err:
        row.update(
            status="error",
            reason=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
            where=traceback.format_exc().splitlines()[-3][:200],
        )
        return row
    report = result.report
    row.update(
        status="injected",
        units=len(report.sites),
        rules=dict(Counter(u.rule for u in report.sites)),
        stages=len(report.stages),
        existing_gates=len(report.existing_gates),
        eq5_agrees=report.eq5_agrees,
        # Eq. 5 with the rounded widths: what the units must hold exactly
        widths_consistent=report.totals.params_added == sum(2 * u.channels * u.hidden for u in report.sites),
        params_added=report.totals.params_added,
        flops_increase=report.totals.flops_increase,
        meta_seconds=round(time.perf_counter() - start, 2),
    )
    if row["params"] > small_params:
        return row
    torch.manual_seed(0)
    model = se_inject.load_model(name).eval()
    failure = ""
    for size in _small_inputs(model):  # the smallest input the model (and its training-only heads) take
        try:
            injected = se_inject.inject(model, input_size=size, **options)
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                diff = (injected.eval()(x) - model(x)).abs().max().item()
            injected.train()
            out = injected(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
        except Exception as err:
            failure = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            continue
        row.update(fwd_bwd=True, preserve_max_diff=diff, input=size)
        break
    else:
        row.update(fwd_bwd=False, fwd_bwd_error=failure)
    return row


def _work(args: tuple[str, str, float]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    return check(*args)


def summarize(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    families: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        c = families[row["family"]]
        c["models"] += 1
        c[row["status"]] += 1
        c["gated"] += bool(row.get("already_gated"))
        if row["status"] == "injected":
            c["eq5"] += bool(row.get("eq5_agrees"))
            c["small"] += "fwd_bwd" in row
            c["fwd_bwd"] += bool(row.get("fwd_bwd"))
            c["exact"] += row.get("preserve_max_diff") == 0.0
    table = Table(title=f"se_inject zoo coverage, {date.today()}, {platform.machine()} CPU, {mp.cpu_count()} cores")
    columns = (
        "family",
        "models",
        "traced",
        "injected",
        "already gated",
        "Eq.5 exact",
        "fwd+bwd (small)",
        "preserve exact",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "family" else "right")
    total = Counter()
    for family in sorted(families):
        c = families[family]
        total.update(c)
        table.add_row(*_cells(family, c))
    table.add_row(*_cells("total", total), style="bold")
    Console(width=140).print(table)
    timm_total = total.copy()
    timm_total.subtract(families.get("torchvision", Counter()))
    for label, c in (("timm", timm_total), ("all", total)):
        traced = c["models"] - c["untraceable"] - c["not built"]
        print(
            f"{label}: {c['models']} models, traced {traced}; injected {c['injected']} "
            f"({c['injected'] / max(traced, 1):.1%} of traced); forward+backward {c['fwd_bwd']}/{c['small']} "
            f"small models ({c['fwd_bwd'] / max(c['small'], 1):.1%})"
        )
    misses = [r for r in rows if r["status"] != "injected" or r.get("fwd_bwd") is False]
    for row in misses:
        print(f"  miss {row['model']}: {row['status']}: {row.get('reason') or row.get('fwd_bwd_error')}")


def _cells(family: str, c: Counter) -> list[str]:
    traced = c["models"] - c["untraceable"] - c["not built"]
    return [
        family,
        str(c["models"]),
        str(traced),
        str(c["injected"]),
        str(c["gated"]),
        str(c["eq5"]),
        f"{c['fwd_bwd']}/{c['small']}",
        str(c["exact"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/zoo.jsonl")
    parser.add_argument("--only", help="glob over model names, e.g. 'resnet*'")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--workers", type=int, default=max(1, mp.cpu_count()))
    parser.add_argument("--small-params", type=float, default=30e6)
    parser.add_argument("--summary-only", action="store_true", help="print the table of an existing --out file")
    args = parser.parse_args()
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.summary_only:
        seen = {r["model"] for r in done}
        todo = [(f, n, args.small_params) for f, n in model_list(args.only) if n not in seen][: args.limit]
        print(f"{len(todo)} models to check ({len(seen)} already in {out})")
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=20) as pool, out.open("a") as sink:
            for i, row in enumerate(pool.imap_unordered(_work, todo), 1):
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                done.append(row)
                if i % 25 == 0:
                    print(f"  {i}/{len(todo)}", flush=True)
    summarize(done)


if __name__ == "__main__":
    main()
