"""Run a tools/ script in-process, the way the tests call the command-line tools: `load_tool("replay")` imports
tools/replay.py as a fresh module; `call_tool("export", argv)` (or `call_tool(module, argv)`) runs its main(argv) and
returns (exit code, stdout, stderr), an argparse SystemExit included."""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a fresh module (not registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_tool(tool: str | ModuleType, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of main(argv) of `tool`: a module from load_tool, or a name (tools/<name>.py,
    loaded fresh)."""
    tool = load_tool(tool) if isinstance(tool, str) else tool
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tool.main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
    return code, out.getvalue(), err.getvalue()
