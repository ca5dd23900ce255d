"""A Ctrl-C while a compile or a load imports its libraries (numpy, networkx, the runtime: on first use, not on
``import cnnc``) is raised once the import is whole: an interrupted import left numpy or networkx half loaded for
good, and every later compile in the process failed with errors such as "module 'numpy' has no attribute
'multiply'" (an interactive session had to be restarted)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# (the module whose import the signal interrupts: imported inside its package's __init__, so that package is half
# done; the call that first imports it)
CASES = [("networkx.classes", "cnnc.compile_string(NET, cache=False)"),
         ("numpy.linalg", "cnnc.compile_string(NET, cache=False)"),
         ("numpy.linalg", "cnnc.load(ARTIFACT)")]


@pytest.mark.parametrize("module,call", CASES)
def test_ctrl_c_during_a_lazy_import_is_raised_after_it_and_the_next_call_works(tmp_path, module, call):
    script = textwrap.dedent(f"""
        import importlib.abc, os, signal, subprocess, sys
        ARTIFACT = {str(tmp_path / "net.cnnc")!r}
        NET = "network n {{ input image: 1x8x8\\n logits = image -> conv(2, 3x3) -> flatten -> dense(3) }}"
        open("net.cnn", "w").write(NET)
        subprocess.run([sys.executable, "-m", "cnnc", "compile", "net.cnn", "-o", ARTIFACT], check=True,
                       capture_output=True)

        class CtrlC(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, CtrlC())
        import cnnc
        try:
            {call}
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        assert {module!r} in sys.modules, "interrupted inside the import"
        m = {call}
        print(m.output_shape)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["interrupted", "(3,)"], done.stdout
