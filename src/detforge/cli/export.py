"""``detforge export RUN --out DEPLOY``: a verified ONNX model with NMS inside, plus its model.json (any
detector family; ``DEPLOY`` local or ``s3://``)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``export`` command."""

    @app.command("export")
    def export_command(
        run: Annotated[str, typer.Argument(help="A training run folder (or its model.safetensors).")],
        out: Annotated[
            str,
            typer.Option(
                "--out", help="The deploy folder to write, local or s3:// (written whole, model.json last)."
            ),
        ] = "deploy",
        which: Annotated[
            str, typer.Option("--which", help="model (last epoch) or best (best validation:mAP).")
        ] = "model",
        opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 17,
        threshold: Annotated[
            float,
            typer.Option("--threshold", help="Default score threshold of the runtime (predict/serve/edge)."),
        ] = 0.3,
        nms_threshold: Annotated[
            float | None, typer.Option("--nms-threshold", help="NMS IoU (default: the run's nms_threshold).")
        ] = None,
        nms_topk: Annotated[
            int | None,
            typer.Option(
                "--nms-topk", help="Candidates per class and detections per image (default: the run's)."
            ),
        ] = None,
        score_threshold: Annotated[
            float | None,
            typer.Option(
                "--score-threshold", help="Scores kept inside the model (default: the run's, 0.01)."
            ),
        ] = None,
        int8: Annotated[
            bool,
            typer.Option("--int8", help="Post-training static int8 quantization (fp32 model kept beside)."),
        ] = False,
        calibration: Annotated[
            str | None,
            typer.Option(
                "--calibration",
                help="Manifest of calibration images for --int8 (default: the run's "
                "training images; never the validation images it is compared on).",
            ),
        ] = None,
        calibration_count: Annotated[
            int, typer.Option("--calibration-count", help="Calibration images used.")
        ] = 32,
        verify_images: Annotated[
            list[str] | None,
            typer.Option(
                "--verify-image", help="Images to verify on (default: the first 4 validation images)."
            ),
        ] = None,
        validation: Annotated[
            str | None,
            typer.Option(
                "--validation",
                help="Validation manifest: verification images and the --int8 comparison "
                "(default: the run's).",
            ),
        ] = None,
        allow_unverified: Annotated[
            bool,
            typer.Option(
                "--allow-unverified",
                help="Export even without real images to verify on (model.json says it is unverified).",
            ),
        ] = False,
        max_map_drop: Annotated[
            float,
            typer.Option(
                "--max-map-drop",
                help="--int8: keep fp32 when int8 loses more validation:mAP points than this.",
            ),
        ] = 1.0,
        min_speedup: Annotated[
            float,
            typer.Option(
                "--min-speedup",
                help="--int8: keep fp32 when int8 is not at least this many times as fast at "
                "batch 1 (0: keep it whatever its speed).",
            ),
        ] = 1.0,
        name: Annotated[str | None, typer.Option("--name", help="Model name in model.json.")] = None,
    ) -> None:
        """Convert a trained run into a deploy folder (model.onnx + model.json), verified against PyTorch."""
        from rich.console import Console

        from detforge.deploy.export import export_run

        console = Console(soft_wrap=True)
        with console.status("exporting and verifying"):
            result = export_run(
                run,
                out,
                which=which,
                opset=opset,
                default_threshold=threshold,
                nms_threshold=nms_threshold,
                nms_topk=nms_topk,
                score_threshold=score_threshold,
                int8=int8,
                calibration=calibration,
                calibration_count=calibration_count,
                verify_images=verify_images,
                validation=validation,
                allow_unverified=allow_unverified,
                max_map_drop=max_map_drop,
                min_speedup=min_speedup,
                name=name,
            )
        meta = result.metadata
        console.print(
            f"wrote {result.model_path} ({meta['quantization']}, {meta['detector']} on "
            f"{meta['base_network']} at {meta['input_size']} px, classes: "
            f"{', '.join(meta['classes'])})"
        )
        v = meta["verification"]
        fp32 = v.get("fp32", v)  # an int8 model's record holds its fp32 twin's
        if fp32["verified"]:
            console.print(
                f"verified on {fp32['samples']}: {fp32['raw_values']} pre-NMS scores and box "
                f"coordinates agree (max score difference {fp32['max_score_diff']:.2g}, max box "
                f"difference {fp32['max_box_diff_px']:.2g} px); {fp32['detections']} detections "
                f"are a valid NMS of them; {fp32['matched']} of PyTorch's "
                f"{fp32['pytorch_detections']} detections >= {fp32['threshold']:g} reproduced "
                "exactly"
            )
        else:
            console.print(f"[bold red]NOT verified[/]: {fp32['reason']} (model.json records it)")
        if v is not fp32:
            console.print(
                f"the int8 graph, verified on the same images: its {v['detections']} detections "
                f"are a valid NMS of its own scores; its pre-NMS scores differ from PyTorch's by "
                f"up to {v['max_score_diff']:.2g} (boxes {v['max_box_diff_px']:.2g} px)"
            )
        if result.int8:
            q = result.int8
            console.print(
                f"int8: calibrated on {q['calibration_images']} images; latency at batch 1: fp32 "
                f"{q['fp32_ms']:.1f} ms, int8 {q['int8_ms']:.1f} ms ({q['speedup']:.2f}x)"
            )
            console.print(
                f"validation:mAP on {q['validation_images']} images of {q['validation']}: fp32 "
                f"{q['fp32_map']:.4f}, int8 {q['int8_map']:.4f} ({q['map_points_lost']:+.2f} "
                "points lost)"
            )
            if q["accepted"]:
                console.print(f"wrote the int8 model; the fp32 model is {out}/{q['fp32_model']}")
            else:
                console.print(
                    f"[bold yellow]int8 refused[/]: {'; '.join(q['refused'])}; "
                    f"{result.model_path} is the fp32 model"
                )
