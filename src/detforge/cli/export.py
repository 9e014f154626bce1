"""``detforge export RUN --out DEPLOY``: a verified ONNX model with NMS inside, plus its model.json."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``export`` command."""

    @app.command("export")
    def export_command(
        run: Annotated[str, typer.Argument(help="A training run folder (or its model.safetensors).")],
        out: Annotated[str, typer.Option("--out", help="The deploy folder to write.")] = "deploy",
        which: Annotated[str, typer.Option(
            "--which", help="model (last epoch) or best (best validation:mAP).")] = "model",
        opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 17,
        threshold: Annotated[float, typer.Option(
            "--threshold", help="Default score threshold of the runtime (predict/serve/edge).")] = 0.3,
        nms_threshold: Annotated[float | None, typer.Option(
            "--nms-threshold", help="NMS IoU (default: the run's nms_threshold).")] = None,
        nms_topk: Annotated[int | None, typer.Option(
            "--nms-topk", help="Candidates per class and detections per image (default: the run's).")] = None,
        score_threshold: Annotated[float | None, typer.Option(
            "--score-threshold", help="Scores kept inside the model (default: the run's, 0.01).")] = None,
        int8: Annotated[bool, typer.Option(
            "--int8", help="Post-training static int8 quantization (fp32 model kept beside).")] = False,
        calibration: Annotated[str | None, typer.Option(
            "--calibration", help="Manifest of calibration images for --int8 (default: the run's "
                                  "validation images).")] = None,
        calibration_count: Annotated[int, typer.Option(
            "--calibration-count", help="Calibration images used.")] = 32,
        verify_images: Annotated[list[str] | None, typer.Option(
            "--verify-image", help="Images to verify on (default: the run's validation images).")] = None,
        name: Annotated[str | None, typer.Option("--name", help="Model name in model.json.")] = None,
    ) -> None:
        """Convert a trained run into a deploy folder (model.onnx + model.json), verified against PyTorch."""
        from rich.console import Console

        from detforge.export import export_run

        console = Console(soft_wrap=True)
        with console.status("exporting and verifying"):
            result = export_run(run, out, which=which, opset=opset, default_threshold=threshold,
                                nms_threshold=nms_threshold, nms_topk=nms_topk,
                                score_threshold=score_threshold,
                                int8=int8, calibration=calibration, calibration_count=calibration_count,
                                verify_images=verify_images, name=name)
        meta, check = result.metadata, result.verify
        console.print(f"wrote {result.model_path} ({meta['quantization']}, {meta['base_network']} at "
                      f"{meta['input_size']} px, classes: {', '.join(meta['classes'])})")
        console.print(f"verified on {meta['verification']['samples']}: {check.detections} detections >= "
                      f"{check.threshold:g} match PyTorch (min IoU {check.min_iou:.4f}, "
                      f"max score difference {check.max_score_diff:.2g})")
        if result.int8:
            q = result.int8
            console.print(f"int8: calibrated on {q['calibration_images']} images; the fp32 model is "
                          f"{out}/{q['fp32_model']}")
            console.print(f"latency at batch 1: fp32 {q['fp32_ms']:.1f} ms, int8 {q['int8_ms']:.1f} ms "
                          f"({q['speedup']:.2f}x)")
            if q.get("validation"):
                console.print(f"validation:mAP on {q['validation']}: fp32 {q['fp32_map']:.4f}, int8 "
                              f"{q['int8_map']:.4f} ({q['map_points_lost']:+.2f} points lost)")
            else:
                console.print("validation:mAP not compared: the run's validation manifest is unknown "
                              "(measure with `detforge evaluate DEPLOY MANIFEST`)")
