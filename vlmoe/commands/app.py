"""``vlmoe app --model DIR``: a local web page for a model (Gradio; ``pip install 'vlmoe[app]'``).

    vlmoe app --model out/vqa                     # http://127.0.0.1:7860
    vlmoe app --model out/caption --port 8080

Upload an image; the page answers with the model's task (a question for VQA, a caption, classes,
detections, an NLVR2 verdict, retrieval scores) and shows the image's routing map (the first-choice
expert of every patch in every vision MoE layer). It binds to 127.0.0.1 unless ``--host`` says
otherwise (``--host 0.0.0.0`` exposes it to the network).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a `vlmoe export` folder or a training .ckpt")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu")
    p.add_argument("--title", help="the page's title")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> Any:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    from vlmoe.app import build_app
    from vlmoe.inference import load

    app = build_app(load(args.model, device=args.device), title=args.title)
    print(f"vlmoe app: {args.model} on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=False, show_error=True, quiet=True)
    return app
