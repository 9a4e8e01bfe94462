"""``python -m dmore_nova.xen.sim``: the ``dmore-sim`` CLI (see :mod:`.supervisor`)."""

from dmore_nova.xen.sim.supervisor import main

raise SystemExit(main())
