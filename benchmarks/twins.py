"""The twin sweep: every timm and torchvision model with an SE-like gate, reproduced from its plain
sibling by the style of its family alone.

Run:  python benchmarks/twins.py [--only GLOB] [--out benchmarks/twins.jsonl] [--table docs/reference/twins.md]

For each model that holds one of the attention modules of tests/twin_harness.py (timm's SEModule,
EfficientNet's SqueezeExcite, ECA, effective SE, GC, CBAM, torchvision's SqueezeExcitation...): build
it as its library builds it (random weights, BatchNorm statistics and attention weights randomised,
float64), replace every attention module by ``nn.Identity`` (the plain sibling), retrofit the sibling
with ``style=`` its family's style (STYLES below) and, where the family chooses its blocks by index
(MobileNetV3's and GhostNet's configs), ``include=`` those blocks; copy the twin's attention weights
into the units and compare every block in float64. A model is reproduced when every block agrees to
1e-10 of its scale. One JSON line per model goes to ``--out`` (an interrupted run resumes); the table
of ``--table`` is written from all lines.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing as mp
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the harness the fast suite uses

TOLERANCE = 1e-10
# models above this many parameters are planned on the meta device only (places and widths checked, not
# values): in float64, the twin, its plain sibling and the retrofit of the largest would not fit here, and
# the whole sweep would take hours on 2 cores; every family has a smaller model run in full
MAX_RUN_PARAMS = 25_000_000

# model name glob -> (style, whether the family chooses its SE blocks by index); the first match decides,
# a model no glob matches has no style yet (its family is named in the table)
STYLES: list[tuple[str, str, bool]] = [
    ("torchvision:efficientnet*", "torchvision_efficientnet", True),
    ("torchvision:mobilenet_v3*", "mobilenetv3", True),
    ("torchvision:regnet_y*", "regnety", False),
    ("torchvision:maxvit*", "maxvit", False),
    ("se*ts", "byobnet", False),  # timm's ByoB networks, before the ResNets whose names they share
    ("se*ts_256", "byobnet", False),
    ("test_byobnet", "byobnet", False),
    ("legacy_*", "senet", False),
    ("resnetrs*", "resnetrs", False),
    ("seresne*", "timm", False),
    ("ecaresne*", "timm", False),
    ("senet154", "timm", False),
    ("sedarknet*", "darknet", False),
    ("cs3sedarknet_x*", "cspnet_r16", False),
    ("cs3se*", "cspnet", False),
    ("tresnet*", "tresnet", True),  # SE in the first three stages
    ("regnety*", "regnety", False),
    ("regnetv*", "regnetv", False),
    ("regnetz_0*", "regnetz_pycls", False),
    ("regnetz_[b-e]*", "regnetz", False),
    ("haloregnetz*", "regnetz", False),
    ("eca_*ts", "byobnet", False),
    ("eca_*ts_256", "byobnet", False),
    ("gcres*", "byobnet", False),
    ("repvgg_*", "repvgg", False),
    ("mobileone_*", "repvgg", True),  # SE in the last stages
    ("lcnet_*", "lcnet", True),
    ("hardcorenas_*", "mobilenetv3", True),
    ("mobilenetv3_large*", "mobilenetv3", True),
    ("mobilenetv3_small*", "mobilenetv3", True),
    ("tf_mobilenetv3*", "mobilenetv3", True),
    ("mobilenetv3_rw", "mobilenetv3_rw", True),
    ("fbnetv3_*", "fbnetv3", True),
    ("semnasnet_*", "mnasnet", True),
    ("mnasnet_small", "mnasnet", True),
    ("*efficientnet*", "efficientnet", True),  # B0-B8, L2, V2, GN, the tests; SE by the config's blocks
    ("tinynet_*", "efficientnet", True),
    ("*mixnet_*", "mixnet", True),
    ("maxvit_*_tf_*", "maxvit", False),
    ("coatnet_[0-9]_224", "maxvit", False),
    ("maxvit_*", "maxvit_rw", False),
    ("test_maxvit", "maxvit_rw", False),
    ("coatnet_0_rw_224", "coatnet_rw_early", False),
    ("coatnet_1_rw_224", "coatnet_rw_early", False),
    ("coatnet_bn_0_rw_224", "coatnet_rw_early", False),
    ("coatnet_rmlp_1_rw_224", "coatnet_rw_early", False),
    ("coatnet_nano_cc_224", "coatnet_rw_relu", False),
    ("coatnet_rmlp_0_rw_224", "coatnet_rw_relu", False),
    ("coatnet_rmlp_1_rw2_224", "coatnet_rw_relu", False),
    ("coatnet_*", "coatnet_rw", False),
    ("test_coatnet", "coatnet_rw", False),
    ("nfnet_f*", "nfnet", False),
    ("dm_nfnet_f*", "nfnet", False),
    ("eca_nfnet_l*", "nfnet", False),
    ("nfnet_l0", "nfnet_l", False),
    ("test_nfnet", "nfnet_l", False),
    ("nf_seresnet*", "nf_resnet", False),
    ("nf_ecaresnet*", "nf_resnet", False),
    ("nf_regnet_*", "nf_regnet", False),
    ("efficientvim_*", "efficientvim", False),
    ("shvit_*", "shvit", False),
    ("efficientvit_m[0-9]", "efficientvit_msra", False),
    ("repvit_*", "repvit", True),  # SE in every other block
    ("ghostnet*", "ghostnet", True),  # GhostNetV3 too
    ("repghostnet_*", "repghost", True),
    ("fastvit_mci*", "fastvit_mci", True),  # the downsampling convs and the final conv
    ("fastvit_*", "fastvit", True),  # the final conv only
    ("gcvit_*", "gcvit", False),
    ("lcnetv2_*", "lcnetv2", True),
    ("cspnext_*", "cspnext", False),
    ("*vovnet*", "vovnet", True),  # the last block of each stage
    ("hgnet_*", "hgnet", False),
    ("rdnet_*", "rdnet", True),  # BlockESE stages: the config's choice
    ("rexnetr_*", "rexnetr", True),
    ("rexnet_*", "rexnet", True),
]
# why the misses miss, where it is known (model glob -> cause), beside the measured reason in the table
CAUSES: list[tuple[str, str]] = [
    (
        "*_pruned",
        "a pruned network keeps the SE widths (ECA kernels) of the unpruned one: per-block groups reproduce it",
    ),
    ("*_g[0-9]*_*", "grouped convs (8 or 16 channels a group) where EfficientNet has depthwise ones"),
    ("fbnetv3_g", "timm applies this model's width multiplier to its SE widths a second time"),
    ("rexnetr_300", "this model's SE widths are made divisible by 16, the family's by 8"),
    (
        "test_efficientnet_ln",
        "timm's LayerNormAct2d permutes to channels-last inside: the conv, norm, activation chain is not seen",
    ),
    ("test_*", "a test network of timm's with options of its own"),
]
# the twin's attention module -> the unit that reproduces it
UNITS = {
    "SEModule": "se",
    "SqueezeExcite": "se",
    "EcaModule": "eca",
    "CecaModule": "ceca",
    "EffectiveSEModule": "ese",
    "GlobalContext": "gc",
    "CbamModule": "cbam",
    "LightCbamModule": "lcbam",
    "SqueezeExcitation": "se",  # torchvision's
    "EseModule": "ese",  # HGNet's
}


def style_for(name: str) -> tuple[str, bool] | None:
    for pattern, style, by_index in STYLES:
        if fnmatch.fnmatchcase(name, pattern):
            return style, by_index
    return None


def se_models(only: str | None) -> list[tuple[str, str]]:
    """(family, name) of every timm and torchvision classification model holding an attention module the
    harness knows, built on the meta device."""
    import timm
    import torchvision
    from twin_harness import attention_modules, build_model, on_meta

    names = timm.list_models() + [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    found = []
    for name in names:
        if only is not None and not fnmatch.fnmatchcase(name, only):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = on_meta(lambda name=name: build_model(name))
        if attention_modules(model):
            family = type(model).__module__.rpartition(".")[2]
            found.append((f"torchvision.{family}" if name.startswith("torchvision:") else family, name))
    return found


def check(family: str, name: str) -> dict:
    from twin_harness import NotReproduced, attention_modules, build_model, on_meta, placed_on_meta, reproduce

    import se_inject

    row: dict = {"family": family, "model": name}
    start = time.perf_counter()
    chosen = style_for(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = on_meta(lambda: build_model(name))
    attention = attention_modules(meta)
    kinds = sorted({type(m).__name__ for m in attention.values()})
    row["attention"] = ", ".join(kinds)
    if chosen is None:
        row.update(status="no style", reason=f"no style names the {family} family's design yet")
        return row
    style, by_index = chosen
    options: dict = {"style": style}
    units = {UNITS.get(kind) for kind in kinds}
    if len(units) != 1 or None in units:
        row.update(status="missed", reason=f"attention modules {kinds} are not one unit of se_inject's")
        return row
    (unit,) = units
    if unit != se_inject.InjectConfig(style=style).unit:
        options["unit"] = unit
    row["call"] = ", ".join(f"{k}={v!r}" for k, v in options.items()) + (
        ", include=[the twin's blocks]" if by_index else ""
    )
    row["params"] = sum(p.numel() for p in meta.parameters())
    try:
        if row["params"] > MAX_RUN_PARAMS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.update(status="placed", units=placed_on_meta(lambda: build_model(name), options, by_index=by_index))
            row["reason"] = (
                f"{row['params'] / 1e6:.0f}M parameters: planned on the meta device, places and widths match"
            )
            return row
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = reproduce(lambda: build_model(name), options, by_index=by_index)
        reproduced = result.worst_block <= TOLERANCE
        row.update(
            status="reproduced" if reproduced else "missed",
            units=result.units,
            worst_block=result.worst_block,
            output=result.output,
        )
        if not reproduced:
            row["reason"] = f"a block differs by {result.worst_block:.1e} of its scale: a unit misplaced or mis-built"
    except NotReproduced as err:
        row.update(status="missed", reason=str(err))
    except se_inject.SEInjectError as err:
        row.update(status="missed", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    except Exception as err:  # a crash is a finding of the sweep, recorded, not a stop
        row.update(status="missed", reason=f"crash: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    cause = next((text for pattern, text in CAUSES if fnmatch.fnmatchcase(name, pattern)), None)
    if row["status"] == "missed" and cause:
        row["reason"] = f"{cause} ({row['reason']})"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _check(args: tuple[str, str]) -> dict:
    return check(*args)


def table(rows: list[dict]) -> str:
    """The committed table: per family, then every model with its call and result or reason."""
    by_family: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_family[row["family"]].append(row)
    status = Counter(row["status"] for row in rows)
    share = (status["reproduced"] + status["placed"]) / max(len(rows), 1)
    lines = [
        "# The twin sweep",
        "",
        "Every timm and torchvision model with an SE-like gate, rebuilt from its plain sibling (every attention",
        "module replaced by `nn.Identity`) with its family's style alone (`include=` the twin's blocks only where",
        "the family chooses them by index), the twin's attention weights copied in, compared block by block in",
        "float64 (random BatchNorm statistics, zero-initialised gains and attention weights; *reproduced*: every",
        f"block within {TOLERANCE:.0e} of its scale). Models over {MAX_RUN_PARAMS // 1_000_000}M parameters are planned",
        "on the meta device (run in float64, they would take the sweep hours on 2 cores; every family has smaller",
        "models run in full): *placed* means one unit in each block where the twin has SE, of the twin's widths",
        "(places and widths checked, not values).",
        "Regenerate with `python benchmarks/twins.py --workers 2` (about 30 minutes on 2 cores).",
        "",
        f"{len(rows)} models: {status['reproduced']} reproduced, {status['placed']} placed ({share:.1%} by a style "
        f"alone), {status['missed']} missed, {status['no style']} in families without a style.",
        "",
        "| family | models | reproduced | placed | missed | no style |",
        "|---|---|---|---|---|---|",
    ]
    for family, members in sorted(by_family.items()):
        count = Counter(r["status"] for r in members)
        lines.append(
            f"| {family} | {len(members)} | {count['reproduced']} | {count['placed']} | {count['missed']} | "
            f"{count['no style']} |"
        )
    lines += ["", "| model | family | call | units | worst block | result or reason |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["family"], r["model"])):
        worst = f"{row['worst_block']:.1e}" if "worst_block" in row else "-"
        result = row["status"] if row["status"] == "reproduced" else f"{row['status']}: {row.get('reason', '')}"
        lines.append(
            f"| {row['model']} | {row['family']} | {row.get('call', '-')} | {row.get('units', '-')} | {worst} | "
            f"{_markdown_text(result)} |"
        )
    return "\n".join(lines) + "\n"


def _markdown_text(text: str) -> str:
    """A reason as table text: an fx node's repr (``call_method[target=reshape](args = ...)``) is not a link."""
    return text.replace("|", "/").replace("[", "\\[").replace("]", "\\]")


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--only", help="a glob over timm model names")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "twins.jsonl"))
    parser.add_argument("--table", default=str(ROOT / "docs" / "reference" / "twins.md"))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    done = {json.loads(line)["model"] for line in out.read_text().splitlines()} if out.exists() else set()
    todo = [(f, n) for f, n in se_models(args.only) if n not in done]
    print(f"{len(todo)} models to check ({len(done)} already in {out})", flush=True)
    with out.open("a") as sink, mp.get_context("spawn").Pool(args.workers, maxtasksperchild=25) as pool:
        for row in pool.imap_unordered(_check, todo):
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(row["model"], row["status"], row.get("reason", ""), flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    Path(args.table).write_text(table(rows))


if __name__ == "__main__":
    main()
