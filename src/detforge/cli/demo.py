"""``detforge demo --out demo/``: the whole workflow end to end on the embedded synthetic dataset."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command."""

    @app.command("demo")
    def demo_command(
        out: Annotated[str, typer.Option("--out", help="Folder for everything the demo makes.")] = "demo",
        start: Annotated[
            str | None,
            typer.Option(
                "--from",
                help="Re-run this step and every later one (synth, prepare, augment, train, evaluate, "
                "export, predict, summary).",
            ),
        ] = None,
        tiny: Annotated[
            bool, typer.Option("--tiny", help="A fast variant (tiny images, one epoch; no accuracy target).")
        ] = False,
        device: Annotated[
            str, typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.")
        ] = "auto",
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    ) -> None:
        """Synthesize, prepare, augment, train, evaluate, export and predict: the workflow in one command."""
        from rich.console import Console

        from detforge.demo import STEPS, run_demo

        console = Console(soft_wrap=True)
        result = run_demo(
            out,
            start=start,
            tiny=tiny,
            device=device,
            progress=progress,
            say=lambda text: console.print(f"   {text}", highlight=False),
            header=lambda i, name: console.rule(f"[bold]{i}/{len(STEPS)} {name}"),
        )
        s = result.summary
        if result.reused:
            console.print(
                f"reused (already done): {', '.join(result.reused)}; re-run a step with --from STEP",
                highlight=False,
            )

        def fmt(value) -> str:
            return "-" if value is None else f"{value:.3f}"

        console.print(
            f"[bold]validation:mAP {fmt(s['validation:mAP'])}[/bold] (PyTorch), "
            f"{fmt(s['onnx_validation:mAP'])} (ONNX Runtime); held-out frames mAP "
            f"{fmt(s['heldout:mAP'])}; {fmt(s['latency_ms'])} ms per image; "
            f"{s['seconds']:.0f} s of work in all ({s['this_run_seconds']:.0f} s this run)"
        )
        for name, path in s["artifacts"].items():
            console.print(f"  {name:<20} {path}", highlight=False)
        console.print("next:")
        for line in s["next"]:
            console.print(f"  {line}", highlight=False)
        console.print(f"  summary: {result.out}/summary.json", highlight=False)
