"""[agent]: the RM agent (one guest's console: RFB server + vkbd/vfb backends)."""

from __future__ import annotations

from oslo_config import cfg

GROUP = cfg.OptGroup("agent", title="RM agent")

OPTS = [
    cfg.StrOpt("xen", default="sim", choices=["sim", "real"],
               help="Hypervisor implementation: the userspace simulator or real Xen."),
    cfg.StrOpt("sim_run_dir",
               help="Run directory of the sim host to attach to (xen=sim)."),
    cfg.IntOpt("backend_domid", default=0, min=0, max=0x7FEF,
               help="The domain this agent acts as on the sim (0 = dom0, or the RM VM's "
                    "domid). On real Xen the own domid is read from xenstore."),
    cfg.IntOpt("guest_domid", min=1, max=0x7FEF,
               help="The guest whose vkbd/vfb this agent serves. Unset: the guest this "
                    "domain has privilege over, read from its own xenstore 'target' node, "
                    "which the toolstack writes when it grants that privilege (libxl for a "
                    "stub domain, dmore-xl-rmvm set-target for an RM VM): an RM VM image "
                    "then needs no per-guest configuration. The agent waits up to "
                    "target_wait seconds for the node."),
    cfg.FloatOpt("target_wait", default=300.0, min=0.0, max=86400.0,
                 help="Seconds to wait for this domain's 'target' node when guest_domid is "
                      "unset (the RM VM may boot before dom0 creates its guest)."),
    cfg.IntOpt("devid", default=0, min=0, help="Device index of the guest's vkbd/vfb."),
    cfg.IntOpt("width", default=800, min=64, max=4096,
               help="Mode offered to the guest (vfb width, vkbd pointer range)."),
    cfg.IntOpt("height", default=600, min=64, max=4096, help="See width."),
    cfg.BoolOpt("plug_vfb", default=False,
                help="Create the guest's vfb device in xenstore (as a toolstack would) and "
                     "serve it. Needed on real Xen when the guest's vkb has "
                     "backend-type=linux: libxl starts QEMU for any vfb in the xl config."),
    cfg.BoolOpt("follow_xl_migrate", default=False,
                help="Follow 'xl migrate' of the guest through xenstore (real Xen, agent in "
                     "dom0, localhost migration): hold viewers' input when libxl asks the "
                     "guest to suspend, plug the vfb of the incoming domain before it "
                     "resumes, re-home to the new domid when xl starts it, replay the held "
                     "input, and answer libxl's teardown of the old backend (else libxl "
                     "waits 10 s and logs 'unable to remove device'). Nothing else tells a "
                     "dom0 agent that its guest migrated: without this, keys typed during "
                     "the migration are lost and the console stays on the old domid."),
    cfg.BoolOpt("xenstore_control", default=False,
                help="Take co-migration requests from dom0 through xenstore (real Xen, agent "
                     "in its own RM VM): dom0 (dmore-xl-rmvm comigrate) writes 'prepare', "
                     "'resume' or 'incoming <domid> <name>' to the RM VM's "
                     "data/dmore-migrate and the agent answers in data/dmore-migrate-ack. "
                     "prepare holds viewers' input and unmaps/unbinds (before xl migrate of "
                     "the RM VM), resume undoes it, incoming re-homes the agent to the "
                     "guest's incoming domain. Malformed or out-of-order requests get an "
                     "error answer and change nothing."),
    cfg.StrOpt("status_file",
               help="Write the agent's state as JSON to this file, atomically, every second "
                    "and after each migration step it follows (guest domid, re-homes, held "
                    "and dropped input, devices connected, the xl follower's steps): for "
                    "tests and monitoring. Unset: no file."),
    cfg.IntOpt("videoram_mb", default=16, min=1, max=64,
               help="Largest guest framebuffer accepted, in MiB (vfb 'videoram')."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)
