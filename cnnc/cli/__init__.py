"""The `cnnc` command: one module per command (check, graph, compile, run, train, eval, gradcheck).

Each command module has ``add_parser(sub)`` and ``run(args, diag) -> status``;
what they share is in ``cnnc.cli.common``. User mistakes in a .cnn file exit
with status 1 and a located message; a missing or unreadable file, an output
that cannot be written and a bad flag exit with status 2 and one line. A
traceback means a bug in cnnc: it is shown, with a line saying so, and the
status is 70 (EX_SOFTWARE).
"""

from cnnc.cli.main import BUG_STATUS, build_parser, main

__all__ = ["BUG_STATUS", "build_parser", "main"]
