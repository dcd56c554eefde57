"""The "works with" table of the docs (docs/reference/works-with.md), generated from this matrix of tests.

Each row names the test that proves it; tests/ecosystem/test_matrix.py checks that every named test
exists and that the page is this file's output. Regenerate the page with
``python tests/ecosystem/matrix.py > docs/reference/works-with.md``.
"""

from __future__ import annotations

# (where models live or go, what is checked, the test that checks it: FILE::FUNCTION under tests/)
MATRIX: list[tuple[str, str, str]] = [
    (
        "Faster R-CNN (slow suite: Mask R-CNN, Keypoint R-CNN, RetinaNet, FCOS)",
        '`target="backbone.body"`: equal boxes at insertion, finite train losses, gradients in the units',
        "ecosystem/test_detection.py::test_detector_backbone_retrofit_keeps_outputs_and_trains",
    ),
    (
        "a whole detector by spec (`torchvision:fasterrcnn_resnet50_fpn`)",
        "save and load the whole detector bit for bit",
        "ecosystem/test_detection.py::test_detector_by_spec_saves_and_loads_bit_for_bit",
    ),
    (
        "a model torch.fx cannot trace whole",
        'the error names the parts to target; `target="auto"` finds them',
        "ecosystem/test_detection.py::test_an_untraceable_detector_names_the_parts_to_target",
    ),
    (
        "DeepLabV3 (slow suite: FCN, LR-ASPP)",
        "equal outputs at insertion, a training step reaches the units",
        "ecosystem/test_detection.py::test_segmenter_retrofit",
    ),
    (
        "dilated ResNets (timm `output_stride=8`, torchvision `replace_stride_with_dilation`)",
        "four stages, per-stage `r`, `stages=[3, 4]`, units named by stage",
        "ecosystem/test_detection.py::test_dilated_resnets_keep_four_stages",
    ),
    (
        "Hugging Face transformers ResNet, RegNet, ConvNeXt, ConvNeXt V2, MobileNetV1, MobileNetV2 (`tf_padding`)",
        "no hand-found leaves; identity at insertion (float64), class, config and `save_pretrained` kept, "
        "save/load bit for bit",
        "ecosystem/test_transformers.py::test_transformers_model_retrofit_without_leaves",
    ),
    (
        "a transformers model from a local directory (`transformers:DIR`) or a type (`transformers:resnet`)",
        "built without a download; save and load without `model=`; pickles and `auto_map` refused",
        "ecosystem/test_transformers.py::test_a_local_directory_is_a_model_source",
    ),
    (
        "a model whose part torch.fx cannot trace",
        "the error names the part and the `target` that works",
        "ecosystem/test_transformers.py::test_an_untraceable_part_is_named_with_the_target_that_works",
    ),
    (
        "`torch.fx.symbolic_trace` (every unit type)",
        "the traced retrofit computes the retrofit; the units' layers are module calls",
        "ecosystem/test_tools.py::test_symbolic_trace_computes_the_retrofit",
    ),
    (
        "`prepare_fx` / `convert_fx` (graph-mode int8)",
        "quantizes and runs; close to the float model",
        "ecosystem/test_tools.py::test_graph_mode_quantization",
    ),
    (
        "`quantize_dynamic` and other module-swapping tools",
        "the units' Linear layers are swapped and called",
        "ecosystem/test_tools.py::test_dynamic_quantization_swaps_the_units_layers",
    ),
    (
        "torchvision `create_feature_extractor`",
        "a unit's output and a stage's features by name",
        "ecosystem/test_tools.py::test_feature_extractor_returns_the_units_features",
    ),
    (
        "forward hooks on a unit's layers (pruning, inspection)",
        "the hook runs",
        "ecosystem/test_tools.py::test_a_hook_on_a_units_layer_runs",
    ),
    (
        "`torch.func.vmap`",
        "per-image results equal the batch's",
        "ecosystem/test_tools.py::test_vmap_over_single_images",
    ),
    (
        "`torch.jit.script`",
        "refused in one line (TorchScript is deprecated: use torch.export)",
        "ecosystem/test_tools.py::test_torchscript_is_refused_in_one_line",
    ),
    (
        "a `torch.compile`d model",
        "retrofitted through the module it wraps, outputs equal",
        "ecosystem/test_tools.py::test_a_compiled_model_is_retrofitted_through_the_module_it_wraps",
    ),
    (
        "checkpoints of wrapped models (`_orig_mod.`, `module.`)",
        "load into the plain model",
        "ecosystem/test_tools.py::test_a_wrapped_models_checkpoint_loads",
    ),
    (
        "`FrozenBatchNorm2d` (torchvision's pretrained detection backbones)",
        "`optimize_for_inference` folds it (float64)",
        "ecosystem/test_tools.py::test_frozen_batchnorm_folds_into_the_squeeze",
    ),
    ("`torch.compile` of a retrofit", "outputs equal (aot_eager, inductor)", "test_interop.py::test_torch_compile"),
    ("`torch.export`", "the exported program computes the retrofit", "test_interop.py::test_torch_export"),
    (
        "ONNX with onnxruntime",
        "the exported model runs in onnxruntime, outputs close",
        "test_interop.py::test_onnx_export_runs_in_onnxruntime",
    ),
    (
        "DistributedDataParallel",
        "a training step changes the units",
        "test_interop.py::test_distributed_data_parallel_trains",
    ),
]


def render() -> str:
    """The page: a header, the table, and how it is made."""
    lines = [
        "# Works with",
        "",
        "Where a retrofit goes and what runs on it. Each row is a test of the suite (its name is beside it);",
        "this page is generated from the matrix in `tests/ecosystem/matrix.py`:",
        "",
        "```",
        "python tests/ecosystem/matrix.py > docs/reference/works-with.md",
        "```",
        "",
        "| Model or tool | Checked | Test |",
        "|---|---|---|",
    ]
    lines += [f"| {where} | {what} | `tests/{test}` |" for where, what, test in MATRIX]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
