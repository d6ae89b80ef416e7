"""Start-up: `import torchrev` and `torchrev --version` load no compiler (torch._dynamo, a
second or more on top of torch's own import), no FSDP and no optional dependency."""

import subprocess
import sys
from pathlib import Path

HEAVY = ("torch._dynamo", "torch.distributed.fsdp", "sympy", "transformers", "matplotlib")


def loaded_after(code):
    probe = f"{code}\nimport sys\nprint('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.rsplit("loaded:", 1)[1].split()


def test_import_loads_no_compiler():
    assert loaded_after("import torchrev") == []


def test_version_loads_no_compiler():
    code = "from torchrev.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    0"
    assert loaded_after(code) == []


def test_once_dynamo_is_loaded_the_engine_breaks_the_graph_as_the_decorator_did():
    """The engine's entry point is ``torch.compiler.disable``-d lazily: traced by Dynamo, a
    direct call to it is one graph break, and the gradients are plain autograd's."""
    import torch
    from torch import nn

    from torchrev import AdditiveCoupling
    from torchrev._core.function import reversible_forward

    torch.manual_seed(0)
    block = AdditiveCoupling(nn.Linear(3, 3), nn.Linear(3, 3))
    a, b = torch.randn(2, 2, 3, requires_grad=True)

    def step(a, b):
        y1, y2 = reversible_forward([block], (a * 2, b), {})
        return (y1 * y2).sum()

    explained = torch._dynamo.explain(step)(a, b)
    assert explained.graph_break_count == 1, explained.break_reasons
    grads = torch.autograd.grad(step(a, b), (a, b))
    plain = torch.autograd.grad((lambda y: (y[0] * y[1]).sum())(block(a * 2, b)), (a, b))
    for mine, reference in zip(grads, plain):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)


INTERRUPT_DURING_IMPORT = """
import builtins, os, signal, sys
sys.path.insert(0, {root!r})
# A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it.
signal.signal(signal.SIGINT, signal.default_int_handler)
real_import = builtins.__import__

def interrupting(name, *args, **kwargs):
    if name == "torch":  # a Ctrl-C while torch imports, as a user pressing it at start-up
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)

builtins.__import__ = interrupting
sys.argv = ["torchrev", "--version"]
import _torchrev_cli
sys.exit(_torchrev_cli.main())
"""


def test_ctrl_c_while_torch_imports_is_one_line_and_status_130():
    """The console script's launcher imports the command inside its Ctrl-C handling."""
    root = str(Path(__file__).parents[1])
    code = INTERRUPT_DURING_IMPORT.format(root=root)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr == "torchrev: interrupted while starting; nothing was done\n"


def test_the_console_script_is_the_launcher():
    project = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '\ntorchrev = "_torchrev_cli:main"' in project
    assert '\npy-modules = ["_torchrev_cli"]' in project


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    import torchrev.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(torchrev.cli, "_parser", interrupted)
    assert torchrev.cli.main(["--version"]) == 130
    assert capsys.readouterr().err == "torchrev: interrupted while starting; nothing was done\n"
