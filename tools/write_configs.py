"""Write the YAML files that are stated in Python: the model presets (``configs/model/*.yaml``), the
finetuning demos (``configs/finetune/<task>/demo.yaml``) and the pretraining demo
(``configs/pretrain/demo.yaml``). Each has one source - ``PRESETS``, the task's ``TaskSpec``, the
pretraining CLI's defaults - and these files are what it says, for reading and for ``--config``.

    python tools/write_configs.py            # rewrite the files
    python tools/write_configs.py --check    # list the files that differ from their source (exit 1)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generated() -> dict[Path, str]:
    """Every generated file (path under the repository) and its text."""
    from vlmoe.models.config import PRESETS, preset_yaml
    from vlmoe.tasks.finetune.cli import demo_yaml
    from vlmoe.tasks.pretrain.cli import demo_yaml as pretrain_demo_yaml
    from vlmoe.tasks.registry import tasks

    files = {ROOT / "configs" / "model" / f"{name}.yaml": preset_yaml(name) for name in PRESETS}
    files |= {ROOT / "configs" / "finetune" / name / "demo.yaml": demo_yaml(name) for name in tasks()}
    files[ROOT / "configs" / "pretrain" / "demo.yaml"] = pretrain_demo_yaml()
    return files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only list the files that differ (exit status 1)")
    args = p.parse_args()
    stale = [path for path, text in generated().items() if not path.is_file() or path.read_text() != text]
    for path in stale:
        if args.check:
            print(f"{path.relative_to(ROOT)} differs from its source; run python tools/write_configs.py")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(generated()[path])
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
