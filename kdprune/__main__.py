"""One entry point for kdprune's tools: ``python -m kdprune <command> [args]``.

  sweep     queue prune ratio x seed experiments and wait for them      (kdprune.sweep)
  report    the sweep report: table, paired test, plot                  (kdprune.report)
  frontier  the accuracy / compression frontier                         (kdprune.frontier)
  study     run (or resume) a preset's study in parts; its analysis     (kdprune.study)
  presets   list, show or run the paper presets                         (kdprune.presets)
  relog     log the current metrics/ and plots/ to MLflow again         (kdprune.tracking relog)
  compare   compare runs                                                (kdprune.compare)
  runcache  push / pull DVC's run-cache with the outputs it names       (kdprune.runcache)
  predict   classify image files with an exported ONNX model            (kdprune.predict)

``python -m kdprune <command> --help`` shows a command's own options. The pipeline's stages are not
commands here: DVC runs them (``dvc repro``, or ``python -m stages.<name>``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

from kdprune import envcheck

# command -> (module, arguments put before the user's)
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sweep": ("kdprune.experiments.sweep", ()),
    "report": ("kdprune.experiments.report", ()),
    "frontier": ("kdprune.experiments.frontier", ()),
    "study": ("kdprune.experiments.study", ()),
    "presets": ("kdprune.presets", ()),
    "relog": ("kdprune.tracking.__main__", ("relog",)),
    "compare": ("kdprune.experiments.compare", ()),
    "runcache": ("kdprune.experiments.runcache", ()),
    "predict": ("kdprune.predict", ()),
}
# what a command needs where it needs less than envcheck.REQUIRED: predict runs an exported model on a machine
# that may have no torch (it imports PIL, numpy and onnxruntime only)
REQUIRES: dict[str, tuple[str, ...]] = {"predict": ("numpy", "PIL", "onnxruntime")}
USAGE = f"usage: python -m kdprune {{{','.join(COMMANDS)}}} [args ...]"


def available(command: str) -> bool:
    """Does this version ship the command's module? (found by name, nothing imported)"""
    return importlib.util.find_spec(COMMANDS[command][0]) is not None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"{USAGE}\n(python -m kdprune --help lists the commands)", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\n" + __doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{USAGE}\nerror: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if not available(command):
        print(f"error: '{command}' is not available in this version of kdprune "
              f"(no module {COMMANDS[command][0]})", file=sys.stderr)
        return 2
    envcheck.require(REQUIRES.get(command, envcheck.REQUIRED))
    module, prefix = COMMANDS[command]
    return importlib.import_module(module).main([*prefix, *rest])


if __name__ == "__main__":
    sys.exit(main())
