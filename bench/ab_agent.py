"""``dmore-rm-agent`` from another tree (``bench/xen_ab.py``): ``python3 -m bench.ab_agent TREE
ARGS...`` runs the agent of ``TREE/dmore_nova`` with ``ARGS``."""

import os
import sys

tree = os.path.abspath(sys.argv.pop(1))
sys.path.insert(0, tree)
from dmore_nova.cmd.rm_agent import main  # noqa: E402

if not sys.modules["dmore_nova"].__file__.startswith(tree):
    raise SystemExit(f"ab_agent: imported {sys.modules['dmore_nova'].__file__}, not from {tree}")
sys.exit(main())
