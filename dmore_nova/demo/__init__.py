"""``dmore-nova demo``: the whole product on one machine, in one command.

Two sim Xen hosts, one guest running a real shell on its framebuffer console, its RM VM (the
guest's device backend, with privilege over it) served by the RM agent, the console proxy, and
a page with noVNC, where things live, and a Migrate button.  Live migrations move the guest
*and* its RM VM (co-migration); the browser's console stays connected and no typed key is lost
or doubled.

* :mod:`.orchestrator` -- :class:`~.orchestrator.Demo`: start, migrate, status, stop;
* :mod:`.api` -- the page, noVNC and the JSON control API over HTTP;
* :mod:`.client` -- the control API's client (``dmore-nova migrate``/``status``);
* :mod:`.runtime` -- the run dir, its state file, stale leftovers, process handling;
* ``web/index.html`` -- the demo page.

The command line is :mod:`dmore_nova.cmd.dmore_nova`.
"""
